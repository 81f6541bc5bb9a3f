"""The linear probe of a headless (self-supervised) backbone, as an evaluation job on one node: DINOv2's
linear protocol on IN-1K train, scored on val (`vfm evaluate --suite linear`). Its second output is the
backbone with the chosen head, a classifier export the in1k / in_c / in_r evaluations then read."""

from typing import NamedTuple

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def linear_probe(recipe_id: str, profile: str, overrides: list, export: str, val: str, knn_train: str, seed: int,
                 parent_run_id: str, mlflow_uri: str, s3_endpoint: str, image: str, run_id: str, namespace: str,
                 backend: str, timeout_hours: float, secret: str, queue: str,
                 launcher: str) -> NamedTuple("Outputs", [("classifier", str), ("result", dict)]):
    """`classifier`: the export URL of backbone + probe; `result`: {seed, suite, metrics} as `evaluate` returns."""
    from typing import NamedTuple

    from vfm.pipeline import steps

    out = steps.evaluate(recipe_id=recipe_id, profile=profile, overrides=overrides, export=export, suite="linear",
                         val=val, knn_train=knn_train, seed=seed, parent_run_id=parent_run_id, mlflow_uri=mlflow_uri,
                         s3_endpoint=s3_endpoint, image=image, run_id=run_id, namespace=namespace, backend=backend,
                         timeout_hours=timeout_hours, secret=secret, queue=queue, launcher=launcher)
    outputs = NamedTuple("Outputs", [("classifier", str), ("result", dict)])  # noqa: UP014 - as KFP documents it
    return outputs(out.pop("classifier"), out)
