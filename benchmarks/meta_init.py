"""What building a recipe's pretraining modules costs a rank's host: the eager CPU build against the deferred
(meta-device) build that `vfm.train.setup` runs (vfm.train.meta_init), for the paper-size model.

    python benchmarks/meta_init.py [--recipe dinov2-giant] [--profile paper]

Each mode runs in its own process, so peak resident memory is its own. The deferred build materialises
into meta tensors here: this machine has no GPU, and the destination stands in for one, so the figure is
the replay's host cost alone (on a GPU node the weights land in GPU memory, a rank's shard of them under
FSDP2). Prints wall seconds, the growth of peak RSS, and the bytes of the modules built.
Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(recipe_id: str, profile: str, mode: str) -> dict:
    import torch

    from vfm.recipes import load_recipe
    from vfm.recipes.derive import resolve_stage
    from vfm.tasks import task_for
    from vfm.throughput import _synthetic_task
    from vfm.train import meta_init
    from vfm.train.task import TaskContext

    recipe = load_recipe(recipe_id, profile=profile)
    spec = task_for(recipe, "pretrain")
    task = _synthetic_task(recipe, "pretrain", 1000, torch.device("cpu"))
    stage = resolve_stage(recipe, "pretrain", recipe.hardware.gpus, task.num_samples,
                          num_classes=None if spec.headless else 1000)
    base, t0 = _rss(), time.perf_counter()
    ctx = TaskContext(stage=stage, device=torch.device("cpu"), rank=0, seed=0, deferred=mode == "deferred")
    replay_peak = None
    if mode == "deferred":
        with meta_init.record() as tape:
            task.build(ctx)
        wanted = meta_init.targets(task.modules())
        replay_peak = meta_init.materialize(tape, wanted)  # into the meta tensors: the stand-in for a GPU
        nbytes = sum(t.spec.nbytes for t in wanted)
    else:
        task.build(ctx)
        nbytes = sum(t.numel() * t.element_size() for m in task.modules().values()
                     for t in list(m.parameters()) + list(m.buffers()))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "seconds": round(seconds, 1), "peak_rss_growth_gb": round((peak - base) / 1e9, 2),
            "module_gb": round(nbytes / 1e9, 2),
            "replay_peak_gb": None if replay_peak is None else round(replay_peak / 1e9, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="dinov2-giant")
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--mode", choices=["eager", "deferred"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(one(args.recipe, args.profile, args.mode)))
        return
    for mode in ("deferred", "eager"):
        out = subprocess.run([sys.executable, __file__, "--recipe", args.recipe, "--profile", args.profile,
                              "--mode", mode], capture_output=True, text=True, check=True)
        print(args.recipe, args.profile, out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
