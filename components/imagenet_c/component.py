"""ImageNet-C for evaluation: the official Zenodo tarballs sharded when `source` names them, else the 15
corruptions × 5 severities regenerated from the sharded IN-1K val set (`vfm make-imagenet-c`)."""

from typing import NamedTuple

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def imagenet_c(source: str, val_manifest: str, data_prefix: str, name: str, corruptions: str, severities: str,
               workers: int, shard_size: str, s3_endpoint: str) -> NamedTuple("Outputs", [("manifest", str), ("sha256", str)]):
    """Args: the official tarballs' folder ("" = regenerate), the val manifest, where to write, optional
    comma lists to restrict what is regenerated, the worker processes (one per CPU the step requests)."""
    from vfm.pipeline import steps

    manifest, sha256 = steps.imagenet_c(source=source, val_manifest=val_manifest, data_prefix=data_prefix, name=name,
                                        corruptions=corruptions, severities=severities, workers=workers,
                                        shard_size=shard_size, s3_endpoint=s3_endpoint)
    return (manifest, sha256)
