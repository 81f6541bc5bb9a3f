"""Helpers the tests share, imported by package path (`from tests.helpers.shards import make_shards`):

- `shards`: tiny learnable shard sets made with vfm.data (synthetic JPEG folder → shards → manifest);
- `archives`: tiny archives in the official ImageNet layouts, with the known bad members;
- `training`: an in-memory `Task` that drives the loop through the protocol alone, and the 2-rank
  trainer command lines (supervised through vfm.train.torchrun, DINOv2 through torchrun);
- `fake_k8s`: a small fake Kubernetes API on loopback for the launcher contract tests.
"""
