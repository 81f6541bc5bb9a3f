"""Exit handler: close the MLflow parent run (FAILED when the pipeline failed) and delete leftover jobs."""

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def on_exit(status: dsl.PipelineTaskFinalStatus, recipe_id: str, run_id: str, namespace: str, backend: str,
            mlflow_uri: str) -> str:
    """Runs whether the body succeeded or failed (dsl.ExitHandler)."""
    from vfm.pipeline import steps

    return steps.finish(state=status.state, error=status.error_message or "", recipe_id=recipe_id, run_id=run_id,
                        namespace=namespace, backend=backend, mlflow_uri=mlflow_uri)
