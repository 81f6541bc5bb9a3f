"""One item per (ablation cell, seed) of paper 002's kernel × expansion grid, each with the cell's overrides,
its resolved-recipe digest and the subset's manifests (kfp.local hands a ParallelFor body only its item:
see components/fan_out_seeds)."""

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def fan_out_cells(recipe_id: str, profile: str, overrides: list, data: str, data_digest: str, parent_run_id: str,
                  val: str, s3_endpoint: str) -> list:
    """Returns [{cell, seed, overrides, recipe_sha, data, data_digest, parent_run_id, val}] for dsl.ParallelFor."""
    from vfm.pipeline import steps

    return steps.fan_out_cells(recipe_id=recipe_id, profile=profile, overrides=overrides, data=data,
                               data_digest=data_digest, parent_run_id=parent_run_id, val=val,
                               s3_endpoint=s3_endpoint)
