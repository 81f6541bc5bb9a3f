"""Datasets to WebDataset shards on S3 and back.

sources (official layouts read in place) -> shard (`vfm shard`: global shuffle, verified resumable
shards, manifest last) -> manifest (`Manifest.load`) -> loader (`build_loader`: exact resume,
disjoint evaluation split) with transforms (`build_transform`, timm). imagenet_c regenerates
ImageNet-C; synthetic writes learnable JPEG folders for tests and the local pipeline.
Submodules are imported explicitly so `import vfm.data` stays cheap (no torch).
"""
