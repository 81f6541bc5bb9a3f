"""Evaluation through the real loader on 2 gloo ranks equals one process: every sample counted once
(ImageNet-C groups split unevenly over the ranks, k-NN features gathered). Imports stay light because
the spawned ranks re-import this module."""

from __future__ import annotations

import os
import socket

import pytest
import torch.multiprocessing as mp

from vfm.evaluate.suite import evaluate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, port, export, data, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out[rank] = evaluate(export, ["in1k", "in_c", "knn"], data, batch_size=2, knn_ks=(1, 3))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(world):
    data = world["data"]
    export = world["exports"][0]
    single = evaluate(export, ["in1k", "in_c", "knn"], data, batch_size=2, knn_ks=(1, 3))
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(_rank, args=(_free_port(), export, dict(data), out), nprocs=2)
    assert out[0] == out[1] == pytest.approx(single)
    assert out[0].keys() == single.keys()
