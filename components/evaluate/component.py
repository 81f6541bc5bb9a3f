"""One evaluation suite (in1k, in_c, in_r or knn) on one export, as a job in the trainer image on the
GPUs of one node (the launcher pod holds no GPU), in its own MLflow child run."""

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def evaluate(recipe_id: str, profile: str, overrides: list, export: str, suite: str, val: str, imagenet_c: str,
             imagenet_r: str, knn_train: str, seed: int, parent_run_id: str, mlflow_uri: str, s3_endpoint: str,
             image: str, run_id: str, namespace: str, backend: str, timeout_hours: float, secret: str, queue: str,
             launcher: str, cell: str = "") -> dict:
    """Returns {seed, suite, metrics} with the stable `eval.<suite>.*` metric names; `launcher`: the job's
    kind, pytorchjob or trainjob; `cell`: the ablation cell the export is ("" for none)."""
    from vfm.pipeline import steps

    return steps.evaluate(recipe_id=recipe_id, profile=profile, overrides=overrides, export=export, suite=suite,
                          val=val, imagenet_c=imagenet_c, imagenet_r=imagenet_r, knn_train=knn_train, seed=seed,
                          parent_run_id=parent_run_id, mlflow_uri=mlflow_uri, s3_endpoint=s3_endpoint, image=image,
                          run_id=run_id, namespace=namespace, backend=backend, timeout_hours=timeout_hours,
                          secret=secret, queue=queue, launcher=launcher, cell=cell)
