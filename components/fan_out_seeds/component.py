"""One item per seed of the last training stage, carrying every upstream value the loop body needs.

kfp.local 2.17 replaces *any* upstream task output passed into a ParallelFor body with the loop item
(kfp/local/orchestrator/task_spec_utils.py: create_parameter_loop_iteration_task_spec), so the body
reads those values from the items (`item.data`, ...) instead; the cluster backend runs it the same way.
"""

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def fan_out_seeds(seeds: list, init: str, data: str, data_digest: str, recipe_sha: str, parent_run_id: str,
                  val: str, imagenet_c: str, imagenet_r: str, knn_train: str) -> list:
    """Returns [{seed, init, data, ...}] for dsl.ParallelFor."""
    from vfm.pipeline import steps

    return steps.fan_out_seeds(seeds, init=init, data=data, data_digest=data_digest, recipe_sha=recipe_sha,
                               parent_run_id=parent_run_id, val=val, imagenet_c=imagenet_c, imagenet_r=imagenet_r,
                               knn_train=knn_train)
