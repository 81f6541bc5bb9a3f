"""The embedding stage of `vfm curate` through Ray Data, with a copy-detection model trained in the test session
(tests/helpers/copy_detector.py) given as a vfm export, the way a user gives theirs: it removes the planted copies
the hashes cannot see, and decontamination removes every planted copy of a val image. The near stage keeps paper 003's
narrow radii (3 bits), so the embedding stage is what catches the cropped, watermarked and colour-shifted copies."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from tests.helpers.copy_detector import IMAGE_THRESHOLD
from tests.helpers.curate_data import ALL_KINDS, make_eval_set, make_pool, plant_eval_copies
from vfm.curate.cli import curate_config
from vfm.curate.run import DECISIONS, ID_SHIFT, curate
from vfm.recipes import load_recipe


def test_embedding_stage_and_decontamination_with_a_trained_model(ray_two_cpus, copy_detector, tmp_path):
    export, _ = copy_detector
    pool = make_pool(tmp_path / "pool", originals=60, seed=0)
    val = make_eval_set(tmp_path / "val", images=12)
    plant_eval_copies(pool, tmp_path / "val", val[:len(ALL_KINDS)], kinds=ALL_KINDS)
    recipe = load_recipe("meta-dinov2-giant", [
        f"curate.embedding.model={export}", "curate.embedding.image_size=40",
        f"curate.embedding.threshold={IMAGE_THRESHOLD}", "curate.embedding.k=8",
        f"curate.decontaminate.threshold={IMAGE_THRESHOLD}", "curate.part_size=32", "curate.shard_size=1MB"])
    cfg = curate_config(recipe, [f"web=folder:{pool.root}"], [f"in1k-val=folder:{tmp_path / 'val'}"])
    result = curate(cfg, str(tmp_path / "out"), workers=2, log=lambda _m: None)
    rows = {r["name"]: r for r in pq.read_table(Path(tmp_path / "out") / DECISIONS).to_pylist()}
    by_rank = {i.rank: i for i in result.inputs}

    def name(image_id: int) -> str:
        return by_rank[image_id >> ID_SHIFT].index.name(image_id & ((1 << ID_SHIFT) - 1))

    # every planted copy, of every kind, is grouped with its original by one of the dedup stages
    grouped = {frozenset((n, name(r["of"]))) for n, r in rows.items() if r["stage"] in ("exact", "near", "embedding")}
    planted = {frozenset((c, o)): kind for c, (kind, o) in pool.copies.items()}
    found = [kind for pair, kind in planted.items() if pair in grouped]
    recall = len(found) / len(planted)
    precision = len(grouped & planted.keys()) / max(1, len(grouped))
    by_stage = {s: sum(1 for r in rows.values() if r["stage"] == s) for s in ("exact", "near", "embedding")}
    print(f"\nexact + near + embedding through Ray: recall {recall:.3f}, precision {precision:.3f}, removed {by_stage}")
    assert recall >= 0.9 and precision >= 0.8
    crops = [c for c, (k, _) in pool.copies.items() if k == "crop"]
    assert sum(frozenset((c, pool.copies[c][1])) in grouped for c in crops) >= 0.9 * len(crops)
    assert by_stage["embedding"] > 0
    assert not any(frozenset(p) in grouped for p in pool.distinct_same_class)

    # decontamination: every planted copy of a val image, crops and colour shifts included
    for copy, (kind, val_name) in pool.eval_copies.items():
        r = rows[copy]
        assert r["stage"] == "decontaminate" and name(r["of"]) == val_name, (copy, kind, r)
    assert result.report["removed"]["decontaminate"].get("embedding_copy_of_eval")
