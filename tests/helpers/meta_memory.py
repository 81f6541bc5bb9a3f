"""One rank of the 2-rank deferred-init memory probe (tests/train/test_meta_init.py): build a ~86 M
parameter ViT (344 MB in fp32) through `setup` with FSDP2, and report by how much the build raised this
process's peak resident memory, then how much an eager build of the same model raises it."""

from __future__ import annotations

import json
import resource
import sys

import torch

from tests.helpers.training import MemoryTask
from vfm import dist as vdist
from vfm.models import build_model
from vfm.recipes import load_recipe
from vfm.recipes.derive import resolve_stage
from vfm.train.setup import setup

BIG = ["hardware.gpus=2", "stages.pretrain.parallelism=fsdp", "model.kwargs.embed_dim=768", "model.kwargs.depth=12",
       "model.kwargs.num_heads=12"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(out: str) -> None:
    info = vdist.init_distributed()
    recipe = load_recipe("vit-huge-pretrain", BIG, profile="smoke")
    task = MemoryTask()
    stage = resolve_stage(recipe, "pretrain", info.world_size, task.num_samples)
    build_model(load_recipe("vit-huge-pretrain", profile="smoke"), "pretrain", num_classes=4)  # code paths warm
    base = _rss()
    t = setup(task, stage, device=info.device, rank=info.rank, seed=0)
    deferred = _peak() - base
    model_bytes = sum(p.numel() * p.element_size() for p in t.model.parameters())  # DTensor: global numel
    after = max(_peak(), _rss())
    eager = build_model(recipe, "pretrain", num_classes=4)
    eager_growth = _peak() - after
    result = {"rank": info.rank, "model_bytes": model_bytes, "deferred_growth": deferred,
              "eager_growth": eager_growth, "eager_params": sum(p.numel() for p in eager.parameters())}
    with open(f"{out}.{info.rank}", "w") as f:
        json.dump(result, f)
    print(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
