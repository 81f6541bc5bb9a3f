"""How long the step loop waits when a checkpoint is triggered: a synchronous DCP save straight to S3 against
`dcp.async_save` (vfm.train.checkpoint, async_checkpoint), for a model of about `--mb` MB (+ its AdamW state),
on a world of one. Uses the embedded moto server on loopback unless AWS_ENDPOINT_URL_S3 names a store.

    python benchmarks/checkpoint_async.py [--mb 100] [--repeats 3]

Prints, per mode, the seconds until `save` returns (the loop's stall) and until the step is committed.
Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from vfm import storage
    from vfm.services import s3_server
    from vfm.train.checkpoint import Checkpointer

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "bench")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("gloo", rank=0, world_size=1)
    width = int((args.mb * 1e6 / 4 / 8) ** 0.5)  # 8 square layers of float32
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    mb = sum(p.numel() for p in model.parameters()) * 4 / 1e6
    with contextlib.ExitStack() as stack:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or stack.enter_context(s3_server())
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        with contextlib.suppress(Exception):
            storage.s3_client(endpoint).create_bucket(Bucket="vfm-bench")
        ckpt = Checkpointer("s3://vfm-bench/ckpt", keep=2, rank=0, world_size=1)
        results: dict[str, list[tuple[float, float]]] = {"sync": [], "async": []}
        step = 0
        for _ in range(args.repeats):
            for mode in ("sync", "async"):
                step += 1
                state = {"model": model.state_dict(), "optim": opt.state_dict()}
                t0 = time.perf_counter()
                ckpt.save(step, state, {"step": step}, {}, asynchronous=mode == "async")
                stall = time.perf_counter() - t0
                ckpt.wait()
                results[mode].append((stall, time.perf_counter() - t0))
    dist.destroy_process_group()
    print(f"model {mb:.0f} MB of float32 weights (+ AdamW state, {3 * mb:.0f} MB in all), endpoint {endpoint}")
    for mode, rows in results.items():
        print(f"{mode:5}: loop stalls {statistics.median(r[0] for r in rows):6.2f} s, committed after "
              f"{statistics.median(r[1] for r in rows):6.2f} s (median of {len(rows)})")


if __name__ == "__main__":
    main()
