"""One training stage (pretrain or finetune, one seed) as a PyTorchJob or TrainJob sized by the recipe; the
launcher pod holds no GPU. The DAG names each use after its stage (`set_display_name`).

The pipeline task's resources / tolerations / node selector are passed through (KFP TaskConfig) to the
job's replicas instead of being applied to this launcher pod."""

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE, task_config_passthroughs=[
    dsl.TaskConfigField.RESOURCES, dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
    dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR])
def train(stage: str, recipe_id: str, profile: str, overrides: list, data: str, data_digest: str, recipe_sha: str,
          image: str, run_id: str, parent_run_id: str, runs_prefix: str, init: str, seed: int, namespace: str,
          backend: str, timeout_hours: float, secret: str, mlflow_uri: str, s3_endpoint: str, knn_train: str,
          knn_val: str, queue: str, launcher: str, task_config: dsl.TaskConfig, cell: str = "") -> str:
    """Returns the export URL the job wrote (or the existing one for the same data, image and recipe).
    `knn_train` / `knn_val`: labelled manifests for the k-NN during DINOv2 pretraining ("" for none);
    `queue`: the Kueue LocalQueue the job joins ("" for none); `launcher`: pytorchjob or trainjob; `cell`: the
    ablation cell ("" outside paper 002's ablation)."""
    from vfm.pipeline import steps

    return steps.train(recipe_id=recipe_id, stage=stage, profile=profile, overrides=overrides, data=data,
                       data_digest=data_digest, recipe_sha=recipe_sha, image=image, run_id=run_id,
                       parent_run_id=parent_run_id, runs_prefix=runs_prefix, init=init, seed=seed,
                       namespace=namespace, backend=backend, timeout_hours=timeout_hours, secret=secret,
                       mlflow_uri=mlflow_uri, s3_endpoint=s3_endpoint, knn_train=knn_train, knn_val=knn_val,
                       queue=queue, task_config=task_config, launcher=launcher, cell=cell)
