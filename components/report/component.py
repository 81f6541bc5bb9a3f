"""Claims vs achieved on the MLflow parent run; returns the Markdown table."""

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def report(recipe_id: str, profile: str, overrides: list, parent_run_id: str, summary: dict, exports: list,
           mlflow_uri: str) -> str:
    """Args: the aggregated metrics and the evaluated exports."""
    from vfm.pipeline import steps

    return steps.report(recipe_id=recipe_id, profile=profile, overrides=overrides, parent_run_id=parent_run_id,
                        summary=summary, exports=exports, mlflow_uri=mlflow_uri)
