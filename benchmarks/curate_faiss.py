"""faiss for embedding dedup: exact flat vs IVF-PQ (vfm.curate.embed), measured at N vectors and extrapolated to
the 1.2 B images of Meta-DINOv2-Giant's pool.

    .venv/bin/python benchmarks/curate_faiss.py [--n 200000] [--dim 256] [--k 16] [--threshold 0.9]
        [--flat-queries N] [--nlist auto] [--pq-m auto] [--nprobe 16] [--threads all] [--workers 64] [--json f.json]

Vectors: random-but-clustered, L2-normalised (1000 Gaussian clusters, within-cluster cosine ~0.5), plus 1% planted
near-copies of random rows at cosine 0.85-0.995 (the pairs dedup must find). Both indexes are built by
`build_index` and searched by `similar_pairs` (every vector a query, k nearest, cosine >= threshold; IVF-PQ
candidates re-ranked with the exact cosine), as the curation driver does. Printed: build and dedup-search seconds,
vectors/s, the index's memory (its serialised size), IVF-PQ's pair recall against flat, and an extrapolation to
1.2e9 vectors on one machine and on `--workers` machines. Timings on a shared machine vary by tens of percent; the
load average is printed. Never asserts timings. `faiss_figures(n, dim)` returns the figures as a dict
(benchmarks/curate_throughput.py calls it; its keys include vfm.plan.FaissReference's fields).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import faiss
import numpy as np

from vfm.curate.embed import build_index, search, similar_pairs

TARGET_N = 1.2e9  # Meta-DINOv2-Giant's pool, "after extensive deduplication and quality filtering"


def clustered(n: int, dim: int, *, clusters: int = 1000, copies: float = 0.01, seed: int = 0) -> np.ndarray:
    """n unit vectors: Gaussian clusters (centre + noise of the same norm: within-cluster cosine ~0.5) whose last
    `copies`·n rows are near-copies of random earlier rows, at cosine 1/sqrt(1 + eps²), eps in [0.1, 0.6]."""
    rng = np.random.default_rng(seed)
    m = int(n * copies)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    x = centres[rng.integers(clusters, size=n)]
    x += rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n - m, m, replace=False)
    u = rng.standard_normal((m, dim), dtype=np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x[n - m:] = x[src] + rng.uniform(0.1, 0.6, (m, 1)).astype(np.float32) * u
    x[n - m:] /= np.linalg.norm(x[n - m:], axis=1, keepdims=True)
    return x


def _index_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def faiss_figures(n: int = 200_000, dim: int = 256, *, k: int = 16, threshold: float = 0.9,
                  flat_queries: int | None = None, nlist: int | None = None, pq_m: int | None = None,
                  nprobe: int = 16, threads: int | None = None, seed: int = 0) -> dict:
    """Build + dedup-search figures of flat and IVF-PQ on `clustered(n, dim)`.

    `flat_queries` (default: all n) queries the flat index with the first rows only (exact search is linear in
    the queries, so its time scales by n / flat_queries); IVF-PQ always searches all n. Pair recall = the share
    of flat's pairs (of those queries) that IVF-PQ's full run reports."""
    if threads:
        faiss.omp_set_num_threads(threads)
    threads = faiss.omp_get_max_threads()
    q = n if flat_queries is None else min(n, flat_queries)
    x = clustered(n, dim, seed=seed)
    ids = np.arange(n)
    out: dict = {"n": n, "dim": dim, "threads": threads, "k": k, "threshold": threshold,
                 "load_average_start": os.getloadavg()}

    t = time.perf_counter()
    flat = build_index(x, kind="flat")
    out["flat_build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    flat_pairs = similar_pairs(flat, x[:q], ids[:q], threshold=threshold, k=k)
    out["flat_queries"], out["flat_search_s"] = q, time.perf_counter() - t
    out["flat_bytes"] = _index_bytes(flat)
    del flat

    t = time.perf_counter()
    ivf = build_index(x, kind="ivfpq", nlist=nlist, pq_m=pq_m, nprobe=nprobe, seed=seed)
    out["ivfpq_build_s"] = time.perf_counter() - t
    out.update(nlist=int(ivf.nlist), pq_m=int(ivf.pq.M), nprobe=int(ivf.nprobe))
    ivf.reset()
    t = time.perf_counter()
    ivf.add(x)  # the add alone (assign to lists + PQ-encode); the rest of the build is k-means training
    out["ivfpq_add_s"] = time.perf_counter() - t
    out["ivfpq_train_s"] = max(0.0, out["ivfpq_build_s"] - out["ivfpq_add_s"])
    t = time.perf_counter()
    search(ivf, x, k)
    out["ivfpq_search_s"] = time.perf_counter() - t  # faiss's search alone
    t = time.perf_counter()
    ivf_pairs = similar_pairs(ivf, x, ids, threshold=threshold, k=k, exact_vectors=x)
    out["ivfpq_pairs_s"] = time.perf_counter() - t  # search + exact re-ranking + pairs
    out["ivfpq_bytes"] = _index_bytes(ivf)

    want = {(a, b) for a, b, _ in flat_pairs}
    got = {(a, b) for a, b, _ in ivf_pairs}
    out["flat_pairs"], out["ivfpq_pairs"] = len(want), len(got)
    out["pair_recall"] = len(want & got) / max(1, len(want))
    # re-ranked pairs are true pairs (exact cosine >= threshold); any beyond flat's were outside flat's top k
    out["ivfpq_extra_pairs"] = len(got - want) if q == n else None
    out["load_average_end"] = os.getloadavg()
    return out


def extrapolate(f: dict, target: float = TARGET_N, workers: int = 64) -> dict:
    """Seconds and bytes at `target` vectors (same dim), on one machine like this one and on `workers` of them.

    flat: all-pairs search is O(N² d): time × (N/n)²; the index is the float32 vectors, N·d·4 bytes.
    IVF-PQ with nlist ≈ 4 √N and a fixed nprobe: assigning a vector to its list (add) and a query's search cost
    nlist·d (coarse) + nprobe·(N/nlist)·m (codes) = O(√N) each, so add and search scale as (N/n)^1.5; k-means on
    its 64·nlist sample costs O(nlist² d) = O(N), and the exact re-ranking O(N k d): both × N/n. Memory: m + 8
    bytes a vector (code + id) in RAM, plus the float32 vectors for the re-ranking, read from disk / a memmap.
    W workers: each holds a replica of the IVF-PQ index (N·(m+8) bytes must fit one host) and searches and
    re-ranks N/W of the queries; `add` is split into W shards merged list by list (faiss `merge_from`); training
    runs once. Flat would give each worker N/W vectors to search all N queries against: time / W."""
    n, big = f["n"], target
    r = big / n
    flat_s = f["flat_search_s"] * (n / f["flat_queries"]) * r ** 2
    rerank = max(0.0, f["ivfpq_pairs_s"] - f["ivfpq_search_s"])
    train, add, srch = f["ivfpq_train_s"] * r, f["ivfpq_add_s"] * r ** 1.5, f["ivfpq_search_s"] * r ** 1.5
    rerank *= r
    return {"target_n": big, "workers": workers,
            "flat_s": flat_s, "flat_s_workers": flat_s / workers, "flat_bytes": big * f["dim"] * 4,
            "ivfpq_nlist": round(4 * math.sqrt(big)), "ivfpq_train_s": train, "ivfpq_add_s": add,
            "ivfpq_search_s": srch, "ivfpq_rerank_s": rerank, "ivfpq_s": train + add + srch + rerank,
            "ivfpq_s_workers": train + (add + srch + rerank) / workers,
            "ivfpq_bytes": big * (f["pq_m"] + 8), "exact_vectors_bytes": big * f["dim"] * 4}


def _human_s(s: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:,.1f} {unit}"
    return f"{s:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--flat-queries", type=int, default=None, help="flat queries (default: all n)")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default: build_index's ~4 sqrt(n))")
    ap.add_argument("--pq-m", type=int, default=None, help="PQ bytes per vector (default: build_index's dim / 8)")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default: faiss's, all cores)")
    ap.add_argument("--workers", type=int, default=64, help="machines for the sharded extrapolation")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()

    f = faiss_figures(args.n, args.dim, k=args.k, threshold=args.threshold, flat_queries=args.flat_queries,
                      nlist=args.nlist, pq_m=args.pq_m, nprobe=args.nprobe, threads=args.threads)
    e = f["extrapolated"] = extrapolate(f, workers=args.workers)
    n = f["n"]
    print(f"{n:,} x {f['dim']}-d clustered unit vectors (1% planted near-copies), k={f['k']}, cosine >= "
          f"{f['threshold']}, faiss {faiss.__version__}, {f['threads']} threads, cores={os.cpu_count()}, "
          f"load average {f['load_average_start'][0]:.1f} -> {f['load_average_end'][0]:.1f}")
    print(f"{'index':32} {'build s':>8} {'build/s':>9} {'search s':>9} {'search/s':>9} {'memory MB':>10} "
          f"{'pairs':>7} {'recall':>7}")
    flat_all = f["flat_search_s"] * n / f["flat_queries"]
    print(f"{'flat (IndexFlatIP, exact)':32} {f['flat_build_s']:8.2f} {n / max(f['flat_build_s'], 1e-9):9.3g} "
          f"{flat_all:9.2f} {n / flat_all:9,.0f} {f['flat_bytes'] / 1e6:10.1f} {f['flat_pairs']:7,} {'(ref)':>7}"
          + (f"   (search: {f['flat_queries']:,} queries timed, x{n / f['flat_queries']:.1f})"
             if f["flat_queries"] < n else ""))
    label = f"IVF{f['nlist']},PQ{f['pq_m']}x8 nprobe {f['nprobe']}"
    print(f"{label:32} {f['ivfpq_build_s']:8.2f} {n / f['ivfpq_build_s']:9,.0f} {f['ivfpq_pairs_s']:9.2f} "
          f"{n / f['ivfpq_pairs_s']:9,.0f} {f['ivfpq_bytes'] / 1e6:10.1f} {f['ivfpq_pairs']:7,} {f['pair_recall']:7.4f}")
    print(f"  IVF-PQ build = k-means {f['ivfpq_train_s']:.2f} s + add {f['ivfpq_add_s']:.2f} s; dedup search = faiss "
          f"search {f['ivfpq_search_s']:.2f} s + exact re-ranking and pairs "
          f"{max(0.0, f['ivfpq_pairs_s'] - f['ivfpq_search_s']):.2f} s; pairs beyond flat's: {f['ivfpq_extra_pairs']}")
    w = e["workers"]
    print(f"\nextrapolated to N = {e['target_n']:.2g} x {f['dim']}-d (per machine: this one, {f['threads']} threads):")
    print(f"  flat:   all pairs O(N^2 d) = x(N/n)^2: {_human_s(e['flat_s'])} on one machine, "
          f"{_human_s(e['flat_s_workers'])} on {w}; index {e['flat_bytes'] / 1e12:,.2f} TB of float32: infeasible")
    print(f"  IVF-PQ: nlist ~ 4 sqrt(N) = {e['ivfpq_nlist']:,}; add + search O(N^1.5) (a vector meets nlist centroids "
          f"and nprobe/nlist of N codes), k-means and re-ranking O(N): k-means {_human_s(e['ivfpq_train_s'])} + add "
          f"{_human_s(e['ivfpq_add_s'])} + search {_human_s(e['ivfpq_search_s'])} + re-rank "
          f"{_human_s(e['ivfpq_rerank_s'])} = {_human_s(e['ivfpq_s'])} on one machine; "
          f"{_human_s(e['ivfpq_s_workers'])} on {w} (k-means once, queries split over index replicas)")
    print(f"          memory: index {e['ivfpq_bytes'] / 1e9:,.0f} GB (m + 8 id bytes a vector) per replica, + "
          f"{e['exact_vectors_bytes'] / 1e12:,.2f} TB float32 vectors on disk for the re-ranking")
    print(json.dumps(f, indent=1, default=float))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(f, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
