"""The data benchmarks must run (tiny sizes here, so they cannot rot between the sessions that quote them);
their figures are never asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("script", "args", "expect"), [
    ("data_shard_throughput.py", ["--images", "100", "--size", "64", "--workers", "2"], "ratio vfm/tar throughput:"),
    ("data_loader_throughput.py", ["--images", "100", "--size", "48", "--resolution", "32", "--rounds", "1",
                                   "--boundary-epochs", "2", "--step-ms", "1"], "with one iterator across epochs"),
    ("jpeg_decode.py", ["--images", "4", "--sizes", "64", "--repeats", "1"], "decode_jpeg, the list"),
    ("imagenet_c_throughput.py", ["--images", "8", "--corruptions", "contrast", "--workers", "2"], "images/s"),
    ("curate_faiss.py", ["--n", "2000", "--dim", "32", "--threads", "1"], "IVF-PQ: nlist"),
    ("curate_throughput.py", ["--originals", "12", "--small", "6", "--part-size", "8", "--codes", "2000",
                              "--embed-images", "4", "--faiss-n", "0"], "extrapolated to meta-dinov2-giant"),
])
def test_data_benchmark_runs(script, args, expect):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW", "AWS_ENDPOINT"))}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout, out.stdout[-2000:]
