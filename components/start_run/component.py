"""Open the MLflow parent run of this pipeline run; outputs its id and the resolved recipe's digest."""

from typing import NamedTuple

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def start_run(recipe_id: str, profile: str, overrides: list, run_id: str, mlflow_uri: str,
              s3_endpoint: str, pipeline: str = "") -> NamedTuple("Outputs", [("parent_run_id", str), ("recipe_sha", str)]):
    """Args: the recipe as the run resolves it (id, profile, --set overrides), KFP run id, endpoints, and the
    pipeline's id when it is not the recipe's (`convnext-xl-ablation`)."""
    from vfm.pipeline import steps

    parent_run_id, recipe_sha = steps.start_run(recipe_id=recipe_id, profile=profile, overrides=overrides,
                                                run_id=run_id, mlflow_uri=mlflow_uri, s3_endpoint=s3_endpoint,
                                                pipeline=pipeline)
    return (parent_run_id, recipe_sha)
