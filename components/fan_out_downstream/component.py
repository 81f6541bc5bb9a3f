"""One item per downstream (dense transfer) stage × seed, carrying every upstream value its loop body reads (as
`fan_out_seeds`: kfp.local hands a ParallelFor body its item, not upstream task outputs)."""

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def fan_out_downstream(recipe_id: str, profile: str, overrides: list, exports: list, recipe_sha: str,
                       parent_run_id: str, ade20k_train: str, ade20k_train_digest: str, ade20k_val: str,
                       coco_train: str, coco_train_digest: str, coco_val: str) -> list:
    """Returns [{stage, seed, suite, init, data, data_digest, val, recipe_sha, parent_run_id}] for dsl.ParallelFor;
    `exports` are the pretraining exports (the first seed's is the backbone every downstream stage starts from)."""
    from vfm.pipeline import steps

    return steps.fan_out_downstream(
        recipe_id=recipe_id, profile=profile, overrides=overrides, exports=exports, recipe_sha=recipe_sha,
        parent_run_id=parent_run_id,
        manifests={"ade20k": (ade20k_train, ade20k_train_digest, ade20k_val),
                   "coco2017": (coco_train, coco_train_digest, coco_val)})
