"""`vfm curate`: the recipe's image pools → quality filter, decontamination, dedup → WebDataset shards + manifest
(unlabelled) + a curation report in MLflow; a KubeRay RayJob on a cluster, Ray in the step locally."""

from typing import NamedTuple

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def curate(recipe_id: str, profile: str, overrides: list, data_prefix: str, sources: list, eval_sets: list,
           run_id: str, parent_run_id: str, image: str, namespace: str, backend: str, timeout_hours: float,
           secret: str, mlflow_uri: str, s3_endpoint: str) -> NamedTuple("Outputs", [("manifest", str), ("sha256", str)]):
    """Args mirror `vfm curate RECIPE --dest <data_prefix>/<curate.dataset> [--source NAME=KIND:PATH ...]
    [--eval-set NAME=KIND:PATH ...]`; empty `sources` / `eval_sets` curate the recipe's own."""
    from vfm.pipeline import steps

    manifest, sha256 = steps.curate(recipe_id=recipe_id, profile=profile, overrides=overrides, data_prefix=data_prefix,
                                    sources=sources, eval_sets=eval_sets, run_id=run_id, parent_run_id=parent_run_id,
                                    image=image, namespace=namespace, backend=backend, timeout_hours=timeout_hours,
                                    secret=secret, mlflow_uri=mlflow_uri, s3_endpoint=s3_endpoint)
    return (manifest, sha256)
