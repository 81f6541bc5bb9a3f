"""`vfm make-imagenet-c`: the 15 corruptions × 5 severities of the sharded IN-1K val set."""

from typing import NamedTuple

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def make_imagenet_c(val_manifest: str, data_prefix: str, name: str, corruptions: str, severities: str,
                    workers: int, s3_endpoint: str) -> NamedTuple("Outputs", [("manifest", str), ("sha256", str)]):
    """Args: the val manifest, where to write, optional comma lists to restrict corruptions/severities,
    the corruption worker processes (one per CPU the step requests)."""
    from vfm.pipeline import steps

    manifest, sha256 = steps.make_imagenet_c(val_manifest=val_manifest, data_prefix=data_prefix, name=name,
                                             corruptions=corruptions,
                                             severities=severities, workers=workers, s3_endpoint=s3_endpoint)
    return (manifest, sha256)
