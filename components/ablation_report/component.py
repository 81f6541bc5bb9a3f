"""Paper 002's ablation report on the MLflow parent run: a table and a top-1 heatmap over kernel × expansion,
with each cell's params and FLOPs; returns the Markdown table."""

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def ablation_report(recipe_id: str, profile: str, overrides: list, parent_run_id: str, results: list,
                    mlflow_uri: str) -> str:
    """`results`: the collected in1k evaluations of every cell ({cell, seed, suite, metrics})."""
    from vfm.pipeline import steps

    return steps.ablation_report(recipe_id=recipe_id, profile=profile, overrides=overrides,
                                 parent_run_id=parent_run_id, results=results, mlflow_uri=mlflow_uri)
