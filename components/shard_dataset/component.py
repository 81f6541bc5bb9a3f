"""`vfm shard`: a source (archive, folder) → WebDataset shards + manifest; reuses a complete manifest."""

from typing import NamedTuple

from kfp import dsl

from vfm.pipeline.config import COMPONENTS_IMAGE


@dsl.component(base_image=COMPONENTS_IMAGE)
def shard_dataset(dataset: str, source: str, data_prefix: str, name: str, labels: str, seed: int, shard_size: str, workers: int,
                  s3_endpoint: str, split: str = "") -> NamedTuple("Outputs", [("manifest", str), ("sha256", str)]):
    """Args mirror `vfm shard DATASET --source --dest <data_prefix>/<name> [--labels] [--split] --seed ...`
    (`split`: train or val of a release holding both, ade20k and coco2017)."""
    from vfm.pipeline import steps

    manifest, sha256 = steps.shard(dataset=dataset, source=source, data_prefix=data_prefix, name=name, labels=labels, seed=seed,
                                   shard_size=shard_size, workers=workers, s3_endpoint=s3_endpoint, split=split)
    return (manifest, sha256)
