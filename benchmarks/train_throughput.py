"""Training throughput: vfm's step against a plain timm + autocast + AdamW loop, same model, same batch,
same run. Writes JSON + a markdown table, and logs to MLflow when MLFLOW_TRACKING_URI is set.

    python benchmarks/train_throughput.py --recipe vit-huge-pretrain --steps 50      # on an H100
    python benchmarks/train_throughput.py --recipe vit-huge --tiny                     # CPU smoke mode

`--set` overrides recipe fields (e.g. stages.pretrain.batch.micro_batch=64, stages.pretrain.compile=true).
Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vfm.recipes import load_recipe
from vfm.throughput import compare, markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--stage", default="pretrain")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="smoke profile on CPU (what CI runs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    micro = None
    profile = "smoke" if args.tiny else "paper"
    base = load_recipe(args.recipe, profile=profile)
    micro = base.stages[args.stage].batch.micro_batch
    # one device, one micro-batch per update: the step itself, not the accumulation arithmetic
    sets = ["hardware.gpus=1", "hardware.gpus_per_node=1", f"stages.{args.stage}.batch.global_batch={micro}",
            f"stages.{args.stage}.batch.grad_accum=1"]
    if args.tiny:
        args.steps, args.warmup = min(args.steps, 3), 1
    recipe = load_recipe(args.recipe, sets + args.overrides, profile)
    result = compare(recipe, args.stage, steps=args.steps, warmup=args.warmup,
                     num_classes=10 if args.tiny else 1000, matmul_n=256 if args.tiny else 8192)
    table = markdown(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"train_throughput-{args.recipe}-{args.stage}-{profile}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(table + "\n")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        from vfm.tracking import tracked_run

        with tracked_run(recipe, stage="benchmark", run_key=f"benchmark/{stem}/{result['device']}") as run:
            for row in result["rows"]:
                tag = "vfm" if row["name"].startswith("vfm") else "plain"
                run.log_metrics({f"bench.{tag}.images_per_s": row["images_per_s"],
                                 f"bench.{tag}.step_time_s": row["step_time_s"],
                                 **({f"bench.{tag}.mfu": row["mfu_spec"]} if row["mfu_spec"] else {})})
            run.log_dict(result, f"{stem}.json")


if __name__ == "__main__":
    main()
