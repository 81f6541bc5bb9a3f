"""The ablation's IN-1K subset (paper 002): `vfm shard --subset-classes` with the class count, fraction and
seed of the resolved recipe's `ablation.subset`; reuses a complete manifest."""

from typing import NamedTuple

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def shard_ablation_subset(recipe_id: str, profile: str, overrides: list, dataset: str, source: str, data_prefix: str,
                          labels: str, shard_size: str, workers: int,
                          s3_endpoint: str) -> NamedTuple("Outputs", [("manifest", str), ("sha256", str)]):
    """`dataset`: in1k (train) or in1k-val; the destination is named after the subset."""
    from vfm.pipeline import steps

    manifest, sha256 = steps.shard_subset(recipe_id=recipe_id, profile=profile, overrides=overrides, dataset=dataset,
                                          source=source, data_prefix=data_prefix, labels=labels,
                                          shard_size=shard_size, workers=workers, s3_endpoint=s3_endpoint)
    return (manifest, sha256)
