"""`vfm curate` stages 1-3 on Ray Data against a single-process loop of the same code, the near-duplicate pair
rate, faiss's flat vs IVF-PQ figures, and their extrapolation to the recipe's images (vfm.plan.curation_estimate,
the same function `vfm plan` prints).

    .venv/bin/python benchmarks/curate_throughput.py [--originals 440] [--small 30] [--workers 2] [--part-size 50]
        [--codes 100000] [--faiss-n 200000] [--faiss-flat-queries 20000] [--recipe meta-dinov2-giant] [--json f.json]

Pools from tests/helpers/curate_data.py `make_pool` (256-400 px photo-like JPEGs and PNGs with planted copies and
bad files; `--originals` 440 makes ~800 files). Measured:
- Ray: `vfm.curate.run.curate` with quality, exact and near on, embedding and decontamination off, `--workers` Ray
  workers (`ray_session(workers)`), into a temp dir, on a small pool (`--small`, run twice: the first run pays the
  workers' start and imports) and on the large one. Phases come from curate's own log lines: index, analyse (decode,
  quality, sha256, pHash/dHash, parquet commit), pairs (read features, hash keys, groupby shuffle, bucket checks,
  decisions) and write (output index + Ray shard tasks). Per-image cost = the slope between the small and large
  runs; fixed overhead = the intercept (dataset scheduling), plus the Ray start timed on its own.
- single process: `analyze` + `quality_reason` on every file, the exact grouping (sha256), `near_pairs` for pHash
  and dHash and the union-find, one process, no Ray.
- near pairs: candidate pairs verified per second, on `--codes` uniform random 64-bit codes through
  `vfm.curate.hashing.near_pairs`, and on one synthetic bucket through the Ray step's `_group_pairs`.
- the embedding's CPU side: its second decode + timm's eval transform at 224 px, per image.
- faiss: `faiss_figures(--faiss-n, 256)` of benchmarks/curate_faiss.py (0 skips it): flat (exact, timed on
  `--faiss-flat-queries` queries) and IVF-PQ build + dedup search with re-ranking.
Then `curation_estimate` with these rates for `--recipe`'s `curate:` block. Timings on a shared machine vary by tens
of percent; the load average is printed. Never asserts timings.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.helpers.curate_data
sys.path.insert(0, str(Path(__file__).resolve().parent))  # curate_faiss

from tests.helpers.curate_data import make_pool  # noqa: E402
from vfm.curate.hashing import components, near_pairs  # noqa: E402
from vfm.curate.quality import QualityThresholds, analyze, quality_reason  # noqa: E402
from vfm.plan import CurateRates, FaissReference, curation_estimate, curation_lines, near_candidates  # noqa: E402


def single_process(pool: Path) -> dict:
    """Stages 1-3 in one process: the same functions `curate` calls, no Ray."""
    files = sorted(pool.iterdir())
    t = QualityThresholds()
    w0, c0 = time.perf_counter(), time.process_time()
    ids, shas, ph, dh = [], [], [], []
    for i, f in enumerate(files):
        feat = analyze(f.read_bytes(), f.name)
        if isinstance(feat, str) or quality_reason(feat, t):
            continue
        ids.append(i)
        shas.append(feat.pixel_sha256)
        ph.append(feat.phash)
        dh.append(feat.dhash)
    analyse_s, analyse_cpu = time.perf_counter() - w0, time.process_time() - c0
    w1 = time.perf_counter()
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in zip(ids, shas, strict=True):
        groups[s].append(i)
    exact = [(g[0], j) for g in groups.values() for j in g[1:]]
    exact_s = time.perf_counter() - w1
    w2 = time.perf_counter()
    near = near_pairs(ids, ph, 10) + near_pairs(ids, dh, 6)
    rep = components(ids, exact + [(a, b) for a, b, _ in near])
    near_s = time.perf_counter() - w2
    total = time.perf_counter() - w0
    return {"images": len(files), "passed_quality": len(ids), "analyse_s": analyse_s,
            "analyse_cpu_s": analyse_cpu, "exact_s": exact_s, "near_s": near_s, "total_s": total,
            "exact_pairs": len(exact), "near_pairs": len(near), "kept": sum(1 for i in ids if rep[i] == i)}


def embed_preprocess(pool: Path, images: int) -> float:
    """CPU seconds per image of the embedding's CPU side (vfm.curate.run._Analyse._embed + Embedder): decode again,
    then timm's eval transform for timm:vit_huge_patch14_224.orig_in21k at 224 px."""
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    with torch.device("meta"):
        model = timm.create_model("vit_huge_patch14_224.orig_in21k", pretrained=False, num_classes=0)
    tf = create_transform(**resolve_data_config({"input_size": (3, 224, 224)}, model=model), is_training=False)
    datas = [f.read_bytes() for f in sorted(pool.iterdir()) if f.suffix in (".jpg", ".png")][:images]
    # leave out the planted bad files as the analysis does (a rejection reason instead of features)
    good = [d for d in datas if not isinstance(analyze(d, "benchmark"), str)]
    c0 = time.process_time()
    for d in good:
        tf(Image.open(io.BytesIO(d)).convert("RGB"))
    return (time.process_time() - c0) / len(good)


def near_rates(codes: int) -> dict:
    """Unique candidate pairs verified per second: near_pairs on uniform codes (pHash settings: 10 bits, 16-bit
    chunks), and the Ray step's bucket check on one synthetic bucket."""
    from vfm.curate.run import _group_pairs

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (codes, 8), dtype=np.uint8)
    hashes = [bytes(r) for r in raw]
    cand, _, _ = near_candidates(codes, 64, 10, 16)
    t = time.perf_counter()
    found = near_pairs(list(range(codes)), hashes, 10, 16)
    np_s = time.perf_counter() - t
    # one multi-index bucket: n_index rows of the key, probes × as many rows of neighbouring keys (pHash: 137 probes)
    n_index, n_probe = 400, 400 * 12
    g = rng.integers(0, 256, (n_index + n_probe, 8), dtype=np.uint8)
    group = {"id": np.arange(n_index + n_probe, dtype=np.int64), "key": np.array(["p:1"] * (n_index + n_probe),
                                                                                   dtype=object),
             "hash": np.array([bytes(r) for r in g], dtype=object),
             "probe": np.arange(n_index + n_probe) >= n_index}
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        _group_pairs(group, {"phash": 10})
    gp_s = (time.perf_counter() - t) / reps
    computed = n_index * (n_index + n_probe)
    return {"codes": codes, "near_pairs_candidates": cand, "near_pairs_s": np_s, "near_pairs_found": len(found),
            "near_pairs_per_s": cand / np_s, "group_pairs_computed": computed, "group_pairs_s": gp_s,
            # every unique candidate is computed twice in the Ray step (from either side's bucket)
            "group_pairs_unique_per_s": computed / 2 / gp_s}


def ray_runs(small: Path, large: Path, workers: int, part_size: int, out: Path) -> dict:
    import ray

    from vfm.curate import ray_session
    from vfm.curate.run import curate
    from vfm.recipes.schema import CurateConfig

    def run(pool: Path, dest: Path) -> dict:
        cfg = CurateConfig(dataset="bench", sources=[{"name": "pool", "kind": "folder", "path": str(pool)}],
                           embedding={"enabled": False}, decontaminate={"enabled": False}, part_size=part_size,
                           workers=workers)
        marks: dict[str, float] = {}

        def log(msg: str) -> None:
            now = time.perf_counter()
            if " sources (" in msg:
                marks["analyse"] = now
            elif msg.startswith("analysed "):
                marks["analysed"] = now
            elif msg.startswith("writing "):
                marks["write"] = now

        t0 = time.perf_counter()
        res = curate(cfg, str(dest), workers=workers, log=log)
        end = time.perf_counter()
        images = sum(s["images"] for s in res.report["sources"].values())
        return {"images": images, "written": res.report["written"], "total_s": end - t0,
                "index_s": marks["analyse"] - t0, "analyse_s": marks["analysed"] - marks["analyse"],
                "pairs_s": marks["write"] - marks["analysed"], "write_s": end - marks["write"],
                "removed": {k: sum(sum(v.values()) for v in r.values()) for k, r in res.report["removed"].items()}}

    t = time.perf_counter()
    with ray_session(workers):
        ray_start = time.perf_counter() - t
        cpus = ray.cluster_resources().get("CPU")
        cold = run(small, out / "cold")
        warm_small = run(small, out / "small")
        warm_large = run(large, out / "large")
    return {"ray_start_s": ray_start, "ray_cpus": cpus, "cold_small": cold, "small": warm_small, "large": warm_large}


def slope(small: dict, large: dict, key: str, count: str = "images") -> tuple[float, float]:
    """(seconds per image, fixed seconds) of one phase from the two runs."""
    s = (large[key] - small[key]) / max(1, large[count] - small[count])
    return s, small[key] - s * small[count]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--originals", type=int, default=440, help="make_pool originals of the large pool (~1.8× files)")
    ap.add_argument("--small", type=int, default=30, help="make_pool originals of the small pool")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (the CPUs ray_session gives Ray)")
    ap.add_argument("--part-size", type=int, default=50, help="images per Ray analyse task (the recipe's: 4096)")
    ap.add_argument("--codes", type=int, default=100_000, help="uniform random codes for the near_pairs rate")
    ap.add_argument("--embed-images", type=int, default=200, help="images for the embedding preprocessing rate")
    ap.add_argument("--faiss-n", type=int, default=200_000, help="vectors for faiss_figures (0: skip)")
    ap.add_argument("--faiss-dim", type=int, default=256)
    ap.add_argument("--faiss-flat-queries", type=int, default=20_000,
                    help="queries timed on the flat index (its time scales linearly; 0: all --faiss-n)")
    ap.add_argument("--recipe", default="meta-dinov2-giant", help="recipe whose curate: block is extrapolated")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()

    figures: dict = {"cores": os.cpu_count(), "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        make_pool(root / "large", originals=args.originals, seed=0)
        make_pool(root / "small", originals=args.small, seed=1)
        figures["pool_build_s"] = time.perf_counter() - t
        sp = figures["single_process"] = single_process(root / "large")
        figures["embed_preprocess_cpu_s"] = embed_preprocess(root / "large", args.embed_images)
        nr = figures["near"] = near_rates(args.codes)
        ray = figures["ray"] = ray_runs(root / "small", root / "large", args.workers, args.part_size, root / "out")
    fx = None
    if args.faiss_n:
        from curate_faiss import faiss_figures

        fx = figures["faiss"] = faiss_figures(args.faiss_n, args.faiss_dim, flat_queries=args.faiss_flat_queries or None)
    figures["load_average_end"] = os.getloadavg()

    w = args.workers
    small, large = ray["small"], ray["large"]
    per = {k: slope(small, large, f"{k}_s") for k in ("analyse", "pairs", "total")}
    per["write"] = slope(small, large, "write_s", "written")
    write_bound = per["write"][0] <= 0  # the shard write of a few hundred images is all fixed cost: its slope is noise
    if write_bound:  # then its whole time over the images written: an upper bound of the per-image cost
        per["write"] = (large["write_s"] / large["written"], 0.0)
    n, n1 = large["images"], sp["images"]
    print(f"cores={os.cpu_count()} load average {figures['load_average_start'][0]:.1f} → "
          f"{figures['load_average_end'][0]:.1f}; pools: {small['images']} and {n} files "
          f"(make_pool originals {args.small} and {args.originals}), part size {args.part_size}, Ray workers {w}")
    print(f"{'stages 1-3':42} {'wall s':>8} {'images/s':>9} {'img/s/core':>10}")

    def row(label: str, secs: float, images: int, cores: int) -> None:
        print(f"{label:42} {secs:8.2f} {images / secs:9.1f} {images / secs / cores:10.1f}")

    row("single process: whole (analyse+exact+near)", sp["total_s"], n1, 1)
    row("single process: analyse + quality_reason", sp["analyse_s"], n1, 1)
    print(f"{'  (its process CPU time)':42} {sp['analyse_cpu_s']:8.2f}   exact {sp['exact_s'] * 1e3:.1f} ms, "
          f"near_pairs + union-find {sp['near_s'] * 1e3:.1f} ms")
    for name, r in (("Ray cold (small, first run)", ray["cold_small"]), ("Ray small", small), ("Ray large", large)):
        row(f"{name}: whole run", r["total_s"], r["images"], w)
        print(f"{'':42} index {r['index_s']:.2f} s, analyse {r['analyse_s']:.2f} s, pairs {r['pairs_s']:.2f} s, "
              f"write {r['write_s']:.2f} s ({r['written']} written)")
    row("Ray large: analyse stage alone", large["analyse_s"], n, w)
    print(f"Ray start (ray.init): {ray['ray_start_s']:.2f} s")
    print("Ray per-image (slope small→large) and fixed (intercept) cost:")
    for k, (s, fixed) in per.items():
        print(f"  {k:8} {s * 1e3:7.2f} ms/image wall at {w} workers = {s * w * 1e3:7.2f} core-ms/image "
              f"({1 / s / w if s > 0 else float('inf'):6.1f} images/s/core); fixed {fixed:6.2f} s")
    if write_bound:
        print("  write: slope ≤ 0 (fixed costs dominate at this size): its whole time / images written, an upper bound")
    frac = (per["total"][1] + ray["ray_start_s"]) / (large["total_s"] + ray["ray_start_s"])
    print(f"  fixed share of the large run (Ray start + intercepts): {frac:.0%}")
    print(f"embedding CPU side (decode + timm transform 224): {figures['embed_preprocess_cpu_s'] * 1e3:.2f} ms/image")
    print(f"near_pairs on {nr['codes']:,} uniform codes (pHash ≤ 10, 16-bit chunks): {nr['near_pairs_candidates']:.3g} "
          f"candidates in {nr['near_pairs_s']:.2f} s = {nr['near_pairs_per_s']:.3g} pairs/s")
    print(f"Ray bucket check (_group_pairs, {nr['group_pairs_computed']:,} distances): {nr['group_pairs_s'] * 1e3:.1f} ms "
          f"= {nr['group_pairs_unique_per_s']:.3g} unique candidates/s")
    faiss_ref = FaissReference(n=0, dim=0, threads=1, k=0, ivfpq_build_s=0.0, ivfpq_search_s=0.0)
    if fx is not None:
        print(f"faiss ({args.faiss_n:,} × {args.faiss_dim}): {json.dumps(fx)}")
        faiss_ref = faiss_reference(fx)

    from vfm.recipes import load_recipe
    from vfm.recipes.datasets import DATASET_SIZES

    rates = CurateRates(analyse_core_s=per["analyse"][0] * w, pairs_core_s=per["pairs"][0] * w,
                        write_core_s=per["write"][0] * w, near_pairs_per_core_s=nr["group_pairs_unique_per_s"],
                        embed_preprocess_core_s=figures["embed_preprocess_cpu_s"], faiss=faiss_ref,
                        measured_by="this run")
    recipe = load_recipe(args.recipe)
    assert recipe.curate is not None, f"{args.recipe} has no curate: block"
    cp = curation_estimate(recipe.curate, DATASET_SIZES[recipe.curate.dataset], rates)
    alt = nr["near_pairs_per_s"]
    near = next((s for s in cp.stages if s.stage == "near"), None)
    print(f"\nextrapolated to {args.recipe} (vfm.plan.curation_estimate with the rates above):")
    for line in curation_lines(cp):
        print(" ", line)
    if near is not None:
        print(f"  (near with near_pairs' rate instead of the Ray step's: "
              f"{near.cpu_core_hours * rates.near_pairs_per_core_s / alt:,.0f} CPU-core-hours)")
    figures["rates"] = {k: getattr(rates, k) for k in ("analyse_core_s", "pairs_core_s", "write_core_s",
                                                       "near_pairs_per_core_s", "embed_preprocess_core_s")}
    figures["faiss_reference"] = faiss_ref.__dict__
    figures["estimate"] = {"cpu_core_hours": cp.cpu_core_hours, "gpu_hours": cp.gpu_hours,
                           "wall_hours": cp.wall_hours, "workers": cp.workers, "workers_for_24h": cp.workers_for_24h,
                           "workers_for_7d": cp.workers_for_7d,
                           "stages": {s.stage: {"cpu_core_hours": s.cpu_core_hours, "gpu_hours": s.gpu_hours,
                                                "worker_hours": s.worker_hours, "serial": s.serial}
                                      for s in cp.stages}}
    text = json.dumps(figures, indent=1, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


def faiss_reference(fx: dict) -> FaissReference:
    """faiss_figures' dict as vfm.plan's reference; IVF-PQ's search is its dedup search with the exact re-ranking
    (`ivfpq_pairs_s`), as `embedding_pairs` does it."""
    return FaissReference(n=fx["n"], dim=fx["dim"], threads=fx["threads"], k=fx["k"], ivfpq_build_s=fx["ivfpq_build_s"],
                          ivfpq_search_s=fx.get("ivfpq_pairs_s", fx["ivfpq_search_s"]),
                          flat_queries=fx["flat_queries"], flat_search_s=fx["flat_search_s"],
                          ivfpq_train_s=fx.get("ivfpq_train_s", 0.0))


if __name__ == "__main__":
    main()
