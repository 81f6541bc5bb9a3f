"""Mean ± sample std over seeds of every suite's metrics (fan-in of the per-seed evaluations)."""

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def aggregate_seeds(in1k: list, in_c: list, in_r: list, knn: list, linear: list, dense: list) -> dict:
    """Each argument is the collected output of one suite's evaluate (or linear probe) tasks (empty when not
    evaluated); `dense`: the downstream stages' evaluations, each stage aggregated over its own seeds."""
    from vfm.pipeline import steps

    return steps.aggregate(in1k + in_c + in_r + knn + linear, dense=dense)
