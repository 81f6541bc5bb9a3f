"""A killed-then-rerun `vfm shard` ends byte-identical to an uninterrupted one, on the S3 endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.helpers.archives import BAD_MEMBERS, bad_member, class_images, write_tar_of_tars
from vfm import storage
from vfm.data.manifest import Manifest
from vfm.data.shard import FAULT_KILL_ENV

WNIDS = ["n00004475", "n01440764", "n02084071", "n15102894"]


def vfm_shard(src, dest, endpoint, extra_env=None, *args):
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": endpoint, **(extra_env or {})}
    cmd = [sys.executable, "-m", "vfm", "shard", "in22k-fall11", "--source", str(src), "--dest", dest,
           "--shard-size", "2500", "--seed", "7", "--workers", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def objects(prefix: str) -> dict[str, bytes]:
    """Every object of a dataset keyed by its path below the prefix."""
    return {url[len(prefix):]: storage.read_bytes(url) for url in storage.list_prefix(prefix)}


def test_killed_then_rerun_equals_uninterrupted(tmp_path, s3_endpoint, bucket):
    content = {w: class_images(w, 6, k) for k, w in enumerate(WNIDS)}
    content["n01440764"]["n01440764_bad.JPEG"] = bad_member("garbage")
    src = write_tar_of_tars(tmp_path / "fall11_whole.tar", content)
    os.environ.setdefault("AWS_ENDPOINT_URL_S3", s3_endpoint)

    clean = vfm_shard(src, f"s3://{bucket}/clean", s3_endpoint)
    assert clean.returncode == 0, clean.stderr

    # SIGKILL right after the 2nd shard's tar is published, before its progress record
    killed = vfm_shard(src, f"s3://{bucket}/crash", s3_endpoint, {FAULT_KILL_ENV: "2"}, "--workers", "1")
    assert killed.returncode == -signal.SIGKILL
    partial = objects(f"s3://{bucket}/crash/")
    assert "manifest.json" not in partial and "_info.json" not in partial
    assert sum(k.endswith(".tar") for k in partial) == 2 and len([k for k in partial if "_progress" in k]) == 1

    # corrupt the recorded shard: it must be detected by its sha256 and rewritten, not kept
    rec = json.loads(partial["_progress/in22k-fall11-000000.tar.json"])
    storage.write_bytes(f"s3://{bucket}/crash/{rec['name']}", b"not the shard")

    rerun = vfm_shard(src, f"s3://{bucket}/crash", s3_endpoint, None, "--workers", "1")
    assert rerun.returncode == 0, rerun.stderr
    a, b = objects(f"s3://{bucket}/clean/"), objects(f"s3://{bucket}/crash/")
    assert a.keys() == b.keys()
    for k in a:
        if k != "manifest.json":
            assert a[k] == b[k], k
    ma, mb = Manifest.load(f"s3://{bucket}/clean"), Manifest.load(f"s3://{bucket}/crash")
    strip = lambda m: [(s.name, s.num_samples, s.bytes, s.sha256) for s in m.shards]  # noqa: E731
    assert strip(ma) == strip(mb) and ma.failures == mb.failures and ma.num_samples == mb.num_samples == 24
    assert [f["reason"].split(":")[0] for f in mb.failures] == ["undecodable image"]

    # a third run finds the committed manifest and does nothing
    again = vfm_shard(src, f"s3://{bucket}/crash", s3_endpoint)
    assert again.returncode == 0 and "already complete" in again.stderr


def test_bounded_runs_complete_the_same_dataset(tmp_path):
    from vfm.data.shard import write_dataset
    from vfm.data.sources import index_source

    content = {w: class_images(w, 5, k) for k, w in enumerate(WNIDS)}
    for kind in BAD_MEMBERS:
        content["n02084071"][f"n02084071_{kind}.JPEG"] = bad_member(kind)
    src = write_tar_of_tars(tmp_path / "fall11_whole.tar", content)
    index = index_source("in22k-fall11", str(src))
    full = write_dataset(index, str(tmp_path / "full"), seed=1, shard_size=2000)
    runs = []
    while True:
        r = write_dataset(index, str(tmp_path / "steps"), seed=1, shard_size=2000, max_new_shards=2)
        runs.append(r)
        if r.manifest is not None:
            break
        assert not (tmp_path / "steps" / "manifest.json").exists()
    assert len(runs) > 2 and all(r.written <= 2 for r in runs)
    assert full.manifest.to_json() == runs[-1].manifest.to_json().replace("/steps/", "/full/")
    assert full.manifest.num_samples == 20


def test_truncated_archive_exits_2_with_message(tmp_path, s3_endpoint, bucket):
    src = write_tar_of_tars(tmp_path / "fall11_whole.tar", {w: class_images(w, 3, 0) for w in WNIDS[:2]})
    cut = tmp_path / "fall11_whole.tar"
    cut.write_bytes(src.read_bytes()[:3000])
    r = vfm_shard(cut, f"s3://{bucket}/t", s3_endpoint)
    assert r.returncode == 2
    text = " ".join(r.stderr.split())
    assert "fall11_whole.tar" in text and "truncated" in text and "rerun the same" in text
