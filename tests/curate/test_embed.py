"""vfm.curate.embed: flat and IVF-PQ search agree on planted near-copies, are deterministic, `retrieve` finds
the planted neighbours of seeds, and an embedding model trained here (a tiny CNN, SimCLR-style, saved as a
vfm export and loaded the way a user's export loads) finds the planted copies of the test pool."""

from __future__ import annotations

import time
from collections import Counter

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.copy_detector import IMAGE_THRESHOLD, KINDS
from tests.helpers.curate_data import make_pool
from vfm.curate.embed import Embedder, build_index, retrieve, search, similar_pairs

THRESHOLD = 0.9  # cosine of a copy for the random vectors (planted copies are at 0.95-0.99, others below 0.85)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch and one faiss thread: the 2-core test machine is shared, and OpenMP threads waiting on a busy
    core make faiss's k-means many times slower."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def _normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _planted_vectors(n: int = 6000, dim: int = 32, copies: int = 300, seed: int = 0):
    """`n` clustered unit vectors (50 clusters) + `copies` near-copies of random rows appended at the end;
    returns (vectors, {(original row, copy row)})."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    base = _normalised(centres[rng.integers(50, size=n)] + 1.5 * rng.standard_normal((n, dim)))
    src = rng.choice(n, copies, replace=False)
    near = _normalised(base[src] + 0.03 * rng.standard_normal((copies, dim)))
    return np.concatenate([base, near]), {(int(s), n + i) for i, s in enumerate(src)}


@pytest.fixture(scope="module")
def planted():
    x, truth = _planted_vectors()
    sims = x @ x.T
    np.fill_diagonal(sims, 0)
    planted_sims = np.array([sims[a, b] for a, b in truth])
    for a, b in truth:
        sims[a, b] = sims[b, a] = 0
    assert planted_sims.min() > 0.95 and sims.max() < THRESHOLD - 0.03  # the planted pairs are the true pairs
    return x, truth


def test_flat_finds_exactly_the_planted_pairs_and_ivfpq_agrees(planted):
    x, truth = planted
    ids = np.arange(len(x))
    flat = build_index(x, kind="flat")
    assert isinstance(flat, faiss.IndexFlatIP)
    pairs = similar_pairs(flat, x, ids, threshold=THRESHOLD)
    assert {(a, b) for a, b, _ in pairs} == truth
    assert all(a < b for a, b, _ in pairs) and len(set(pairs)) == len(pairs)

    t0 = time.perf_counter()
    ivfpq = build_index(x, kind="ivfpq", seed=0)
    t_build = time.perf_counter() - t0
    assert isinstance(ivfpq, faiss.IndexIVFPQ)
    assert ivfpq.nlist == round(4 * np.sqrt(len(x))) and ivfpq.pq.M == 4 and ivfpq.nprobe == 16
    approx = similar_pairs(ivfpq, x, ids, threshold=THRESHOLD, exact_vectors=x)
    exact = {(a, b): s for a, b, s in pairs}
    found = {(a, b) for a, b, _ in approx}
    recall = len(found & truth) / len(truth)
    print(f"\nIVF-PQ (nlist {ivfpq.nlist}, PQ{ivfpq.pq.M}x8, nprobe {ivfpq.nprobe}) on {len(x)} x {x.shape[1]}-d: "
          f"pair recall vs flat {recall:.3f}, build {t_build:.1f} s")
    assert recall >= 0.95
    # re-ranked: every pair IVF-PQ reports is a true pair, at the exact cosine
    assert found <= truth
    assert all(abs(s - exact[a, b]) < 1e-5 for a, b, s in approx)

    # deterministic: the same pairs and search results from a second build, and with two faiss threads
    again = build_index(x, kind="ivfpq", seed=0)
    assert similar_pairs(again, x, ids, threshold=THRESHOLD, exact_vectors=x) == approx
    faiss.omp_set_num_threads(2)
    two = build_index(x, kind="ivfpq", seed=0)
    d1, i1 = search(ivfpq, x[:500], 16)
    d2, i2 = search(two, x[:500], 16)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    assert similar_pairs(two, x, ids, threshold=THRESHOLD, exact_vectors=x) == approx


def test_similar_pairs_over_query_batches_and_other_indexes(planted):
    x, truth = planted
    ids = np.arange(len(x))
    index = build_index(x, kind="flat")
    whole = similar_pairs(index, x, ids, threshold=THRESHOLD)
    # the Ray driver's shape: batches of the pool against an index of the whole pool; a pair is seen from
    # both of its ends, and each end finds the same pair
    batched = set()
    for s in range(0, len(x), 1000):
        batched |= set(similar_pairs(index, x[s:s + 1000], ids[s:s + 1000], threshold=THRESHOLD))
    assert {(a, b) for a, b, _ in batched} == {(a, b) for a, b, _ in whole}

    # an index of another set (e.g. an eval set) with ids disjoint from the pool's: pool id < eval id
    copies = sorted(truth)[:20]
    eval_rows = np.array([b for _, b in copies])
    eval_index = build_index(x[eval_rows], kind="flat")
    eval_ids = 10_000_000 + np.arange(len(eval_rows))
    hits = similar_pairs(eval_index, x[:6000], ids[:6000], threshold=THRESHOLD, index_ids=eval_ids)
    assert {(a, b) for a, b, _ in hits} == {(a, int(eval_ids[i])) for i, (a, _) in enumerate(copies)}

    ivf = build_index(x, kind="ivfpq", nlist=16, pq_m=8)
    with pytest.raises(ValueError, match="exact_vectors"):
        similar_pairs(ivf, x[:10], ids[:10], threshold=THRESHOLD)


def test_retrieve_returns_the_planted_neighbours_of_seeds():
    rng = np.random.default_rng(3)
    x, _ = _planted_vectors(copies=1, seed=1)
    seeds = _normalised(rng.standard_normal((30, x.shape[1])))
    neighbours = np.concatenate([_normalised(seeds + 0.05 * rng.standard_normal(seeds.shape)) for _ in range(3)])
    pool = np.concatenate([x, neighbours])
    rows = rng.permutation(len(pool))  # planted rows spread through the pool
    pool = pool[rows]
    planted_pos = np.sort(np.argsort(rows)[len(x):])
    flat = build_index(pool, kind="flat")
    got = retrieve(flat, seeds, k=3)
    assert got.dtype == np.int64 and np.array_equal(got, planted_pos)
    ivf = retrieve(build_index(pool, kind="ivfpq"), seeds, k=3)
    assert np.all(np.diff(ivf) > 0)
    assert len(np.intersect1d(ivf, planted_pos)) >= 0.95 * len(planted_pos)


def test_build_index_choices():
    x, _ = _planted_vectors(n=2000, dim=48, copies=1)
    assert isinstance(build_index(x), faiss.IndexFlatIP)  # auto: flat up to flat_max
    auto = build_index(x, flat_max=1000, nlist=8)
    assert isinstance(auto, faiss.IndexIVFPQ) and auto.nlist == 8 and auto.pq.M == 6  # 48 / 8 dims per code
    assert auto.ntotal == len(x)
    with pytest.raises(ValueError, match="divide"):
        build_index(x, kind="ivfpq", nlist=8, pq_m=7)
    with pytest.raises(ValueError, match="normalised"):
        build_index(x * 2, kind="flat")
    with pytest.raises(ValueError, match="kind"):
        build_index(x, kind="hnsw")


def test_embedder_from_a_timm_name():
    torch.manual_seed(0)
    emb = Embedder.from_spec("timm:test_vit", image_size=32, pretrained=False, batch_size=3)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)) for i in range(5)]
    images.append(images[0].convert("L"))  # grayscale in, RGB embedded
    out = emb(images)
    assert out.shape == (6, emb.dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    emb.batch_size = 64  # batching does not change the embeddings
    np.testing.assert_allclose(emb(images), out, atol=1e-5)


def test_embedding_recall_on_the_planted_pool(tmp_path, copy_detector):
    export, t_train = copy_detector
    pool = make_pool(tmp_path / "pool", originals=60, seed=0)
    names = sorted(p.name for p in pool.root.iterdir() if p.name not in pool.bad)
    emb = Embedder.from_spec(export)  # as `vfm curate` loads a user's export
    assert emb.dim == 128
    vectors = emb([Image.open(pool.root / n) for n in names])
    ids = np.arange(len(names))
    pairs = similar_pairs(build_index(vectors), vectors, ids, threshold=IMAGE_THRESHOLD)
    found = {frozenset((names[a], names[b])) for a, b, _ in pairs}

    truth = {frozenset((c, o)): kind for c, (kind, o) in pool.copies.items()}
    hit = Counter(kind for pair, kind in truth.items() if pair in found)
    total = Counter(truth.values())
    false = found - truth.keys()
    flagged_same_class = [p for p in pool.distinct_same_class if frozenset(p) in found]
    recall = sum(hit[k] for k in KINDS) / sum(total[k] for k in KINDS)
    precision = len(found & truth.keys()) / max(1, len(found))
    print(f"\ncosine >= {IMAGE_THRESHOLD} on {len(names)} images ({len(truth)} planted copies), model trained "
          f"in {t_train:.1f} s: recall {recall:.3f} over {KINDS}, precision {precision:.3f} "
          f"({len(false)} false pairs of {len(names) * (len(names) - 1) // 2}), "
          f"{len(flagged_same_class)} of {len(pool.distinct_same_class)} same-class pairs flagged")
    sims = vectors @ vectors.T
    pos = {n: i for i, n in enumerate(names)}
    cos = {kind: sorted(float(sims[pos[c], pos[o]]) for c, (k, o) in pool.copies.items() if k == kind)
           for kind in total}
    same_class = max(float(sims[pos[a], pos[b]]) for a, b in pool.distinct_same_class)
    for kind in sorted(total):
        print(f"  {kind:9s} recall {hit[kind] / total[kind]:.3f} ({hit[kind]}/{total[kind]}), "
              f"copy cosines {cos[kind][0]:.3f}..{cos[kind][-1]:.3f}")
    print(f"  highest cosine of a distinct same-class pair {same_class:.3f}")
    assert recall >= 0.9
    assert hit["resave"] == total["resave"]
    assert not flagged_same_class
    assert precision >= 0.8
