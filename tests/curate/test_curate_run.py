"""`vfm curate` end to end on Ray Data, on a pool with planted duplicates made in the test (tests/helpers/curate_data):
what each stage removes, against what was planted; 1 vs 2 Ray workers; a driver killed mid-run and rerun; the report
in MLflow; the shards read back by vfm's own loader."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers.curate_data import HASH_KINDS, make_eval_set, make_pool, plant_eval_copies
from vfm import storage
from vfm.curate.cli import curate_config
from vfm.curate.run import DECISIONS, FAULT_KILL_ENV, curate
from vfm.data.manifest import MANIFEST_NAME, Manifest
from vfm.recipes import load_recipe

# exact + pHash/dHash at vfm's default radii (paper 003's recipe narrows them for 1.2 B images) + decontamination
HASH_ONLY = ["curate.embedding.enabled=false", "curate.near.phash_max_distance=10", "curate.near.dhash_max_distance=6",
             "curate.part_size=12", "curate.shard_size=1MB"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    pool = make_pool(root / "pool", originals=60, seed=0)
    val = make_eval_set(root / "val", images=12)
    # copies of val images of the kinds the hashes catch (the embedding test plants the rest)
    plant_eval_copies(pool, root / "val", val[:len(HASH_KINDS)], kinds=HASH_KINDS)
    return pool, root / "val"


def _config(pool, val_root, overrides=HASH_ONLY):
    recipe = load_recipe("meta-dinov2-giant", overrides, "smoke")
    return curate_config(recipe, [f"web=folder:{pool.root}"], [f"in1k-val=folder:{val_root}"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _decisions(dest) -> dict[str, dict]:
    table = pq.read_table(Path(dest) / DECISIONS).to_pylist()
    return {row["name"]: row for row in table}


def test_hash_stages_find_the_planted_copies_and_skip_bad_inputs(ray_two_cpus, planted, tmp_path):
    pool, val_root = planted
    cfg = _config(pool, val_root)
    # the recipe's quality thresholds, not the smoke profile's (which are sized for 32 px digits)
    cfg = cfg.model_copy(update={"quality": load_recipe("meta-dinov2-giant").curate.quality})
    result = curate(cfg, str(tmp_path / "out"), workers=2, log=lambda _m: None)
    removed = _decisions(tmp_path / "out")
    ids = {row["id"]: name for name, row in removed.items()}

    # each planted copy of a kind the hashes should catch is grouped with its original: one of the two removed as a
    # copy of the other (which one survives is the smaller id's choice, not the test's)
    found, flagged_wrong = {k: 0 for k in HASH_KINDS}, []
    # a pair is right when it was planted, of any kind (a crop that pHash happens to catch is a true copy)
    planted_pairs = {frozenset((c, o)) for c, (k, o) in pool.copies.items()}
    for name, row in removed.items():
        if row["stage"] not in ("exact", "near"):
            continue
        of = ids.get(row["of"]) or _name_of(result, row["of"])
        if frozenset((name, of)) not in planted_pairs:
            flagged_wrong.append((name, of, row["stage"]))
    for copy, (kind, original) in pool.copies.items():
        if kind in HASH_KINDS:
            r_copy, r_orig = removed.get(copy), removed.get(original)
            hit = ((r_copy and r_copy["stage"] in ("exact", "near") and _name_of(result, r_copy["of"]) == original)
                   or (r_orig and r_orig["stage"] in ("exact", "near") and _name_of(result, r_orig["of"]) == copy))
            found[kind] += bool(hit)
    total = {k: sum(1 for kind, _ in pool.copies.values() if kind == k) for k in HASH_KINDS}
    recall = sum(found.values()) / sum(total.values())
    flagged = sum(1 for r in removed.values() if r["stage"] in ("exact", "near"))
    precision = (flagged - len(flagged_wrong)) / max(flagged, 1)
    print(f"hash stages through Ray: recall {recall:.3f} ({found} of {total}), precision {precision:.3f}; not planted: {flagged_wrong}")
    assert recall >= 0.95 and precision >= 0.95, (found, total, flagged_wrong)
    # resaved copies (same pixels, other bytes) are the exact stage's
    assert all("exact" in ((removed.get(c) or {}).get("stage"), (removed.get(o) or {}).get("stage"))
               for c, (k, o) in pool.copies.items() if k == "resave")
    # distinct images of one class are not duplicates
    grouped = {frozenset((n, _name_of(result, r["of"]))) for n, r in removed.items() if r["of"] >= 0}
    assert not any(frozenset(p) in grouped for p in pool.distinct_same_class)

    # decontamination: every planted copy of a val image is gone, as a copy of that val image
    for copy, (kind, val_name) in pool.eval_copies.items():
        row = removed[copy]
        assert row["stage"] == "decontaminate" and _name_of(result, row["of"]) == val_name, (copy, kind, row)

    # bad inputs: skipped or filtered with their reason, reported, and the run went on
    for name, reason in pool.bad.items():
        if reason == "grayscale":  # kept unless the recipe drops grayscale images
            assert name not in removed
            continue
        assert name in removed and removed[name]["reason"] == reason, (name, reason, removed.get(name))
    m = result.manifest
    skipped = {f["name"]: f["reason"] for f in m.failures}
    assert {n for n, r in pool.bad.items() if r in ("zero_bytes", "corrupt", "truncated")} <= set(skipped)
    rep = result.report
    assert rep["removed"]["decode"]["zero_bytes"]["web"] == 1
    assert rep["kept"] == m.num_samples == rep["sources"]["web"]["kept"]
    assert rep["sources"]["web"]["images"] == rep["kept"] + sum(
        n for reasons in rep["removed"].values() for by_src in reasons.values() for n in by_src.values())

    # the shards are vfm's own, unlabelled: the loader reads them, label -1, the curation json per sample
    from vfm.data.loader import decode_sample, slot_stream

    loaded = Manifest.load(str(tmp_path / "out"))
    assert loaded.task == "unlabelled" and loaded.classes == []
    samples = list(slot_stream(loaded, slot=0, num_slots=1, seed=0, shuffle=False, shuffle_buffer=1, start=0,
                               repeat=False))
    assert len(samples) == m.num_samples
    img, label, meta = decode_sample(samples[0])
    assert label == -1 and meta["source"] == "web" and img.size[0] > 0
    kept_names = sorted(json.loads(s["json"])["name"] for s in samples)
    assert len(set(kept_names)) == len(kept_names) and not set(kept_names) & set(removed)


def _name_of(result, image_id: int) -> str:
    from vfm.curate.run import ID_SHIFT

    inp = next(i for i in result.inputs if i.rank == image_id >> ID_SHIFT)
    return inp.index.name(image_id & ((1 << ID_SHIFT) - 1))


def test_one_and_two_ray_workers_write_the_same_manifest(ray_two_cpus, planted, tmp_path):
    pool, val_root = planted
    cfg = _config(pool, val_root)
    dest = tmp_path / "out"
    digests = []
    for workers in (1, 2):
        shutil.rmtree(dest, ignore_errors=True)
        curate(cfg, str(dest), workers=workers, log=lambda _m: None)
        digests.append((_sha(dest / MANIFEST_NAME), _sha(dest / DECISIONS)))
    assert digests[0] == digests[1]


def test_a_driver_killed_mid_run_resumes_without_loss_or_duplicates(ray_two_cpus, planted, tmp_path, mlflow_uri,
                                                                    s3_endpoint, bucket):
    """The CLI as a pipeline step runs it, to S3, with MLflow: killed (SIGKILL of the driver) after two parts are
    committed, then rerun: the manifest is the one an uninterrupted run writes, every image in it once, and the
    report is in MLflow."""
    pool, val_root = planted
    dest = f"s3://{bucket}/curated"
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": s3_endpoint, "MLFLOW_TRACKING_URI": mlflow_uri}
    cmd = [sys.executable, "-m", "vfm", "curate", "meta-dinov2-giant", "--profile", "smoke", "--dest", dest,
           "--source", f"web=folder:{pool.root}", "--eval-set", f"in1k-val=folder:{val_root}", "--workers", "2"]
    for o in HASH_ONLY:
        cmd += ["--set", o]

    def manifest_sha() -> str:
        return hashlib.sha256(storage.read_bytes(storage.join(dest, MANIFEST_NAME), s3_endpoint)).hexdigest()

    # the uninterrupted run, in this process (the CLI's settings are these)
    curate(_config(pool, val_root), dest, workers=2, endpoint_url=s3_endpoint, log=lambda _m: None)
    want = manifest_sha()
    storage.delete_prefix(dest, s3_endpoint)

    killed = subprocess.run(cmd, env={**env, FAULT_KILL_ENV: "2"}, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not storage.exists(storage.join(dest, MANIFEST_NAME), s3_endpoint)
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    done = re.search(r"analysed (\d+) parts, (\d+) committed by an earlier run", out)
    assert done and int(done.group(1)) >= 1 and int(done.group(2)) >= 2, out[-2000:]
    assert manifest_sha() == want
    m = Manifest.load(dest, s3_endpoint)
    keys = [k for s in m.shards for k in _keys(storage.read_bytes(storage.join(dest, s.name), s3_endpoint))]
    assert len(keys) == len(set(keys)) == m.num_samples

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("vfm/meta-dinov2-giant")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`vfm.stage` = 'curate'")
    run = runs[0]
    assert run.data.metrics["written"] == m.num_samples
    assert run.data.metrics["removed.decontaminate"] == len(HASH_KINDS)
    assert run.data.params["curate.near.phash_max_distance"] == "10"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "curation")}
    assert {"curation/report.json", "curation/examples.png", "curation/decisions.parquet"} <= artifacts
    png = Path(client.download_artifacts(run.info.run_id, "curation/examples.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _keys(tar_bytes: bytes) -> list[str]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        return [m.name.rsplit(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".json")]
