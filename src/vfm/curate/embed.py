"""Embeddings and faiss search for data curation: DINOv2's LVD-142M recipe (Oquab et al. 2023, section 3 and
appendix A): embed every image with a self-supervised backbone, remove copies at a cosine threshold
(copy-detection dedup), and retrieve the k nearest neighbours of curated seed images.

Cosine similarity is the inner product of L2-normalised float32 vectors: `Embedder` normalises, every index is
an inner-product index. `build_index` gives an exact `IndexFlatIP` up to `flat_max` vectors and an IVF-PQ index
beyond (memory ~ `pq_m` bytes + an 8-byte id per vector); PQ scores are approximate, so `similar_pairs`
re-ranks IVF-PQ candidates with the exact cosine of the stored float32 vectors.

Own code here is only what neither faiss nor timm provides: the export/timm loading glue, the seeded training
sample, and turning k-NN results into unique (id_a, id_b, cosine) pairs with exact re-ranking.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import faiss
    from PIL import Image

# queries per faiss call, and the float budget of one chunk's gathered candidate vectors in the re-ranking
SEARCH_BATCH = 65_536
RERANK_FLOATS = 1 << 24  # 64 MiB of float32


class Embedder:
    """Images -> L2-normalised float32 embeddings: the backbone's image embedding before any classifier
    (`vfm.evaluate.knn.cls_features`, what k-NN evaluation scores: a ViT's final-norm CLS token, a CNN's
    pooled features), after timm's eval transform (short-side resize to size / crop_pct, centre crop,
    normalise)."""

    def __init__(self, model: Any, transform: Any, dim: int, *, device: str = "cpu", batch_size: int = 64):
        self.model, self.transform, self.dim = model.eval(), transform, int(dim)
        self.device, self.batch_size = device, batch_size

    @classmethod
    def from_spec(cls, spec: str, *, image_size: int | None = None, device: str = "cpu", pretrained: bool = True,
                  batch_size: int = 64) -> Embedder:
        """`spec`: "timm:<name>" (`timm.create_model(name, pretrained=pretrained, num_classes=0)` with timm's own
        data config for it) or the path / s3:// URL of a vfm export (`vfm.export.load_export`; the transform
        from the export's resolution, crop_pct, mean and std). `image_size` overrides the input size (a ViT's
        position embeddings are resampled to it by timm's `set_input_size`)."""
        import timm
        from timm.data import create_transform, resolve_data_config

        if spec.startswith("timm:"):
            import torch

            with torch.random.fork_rng():  # a randomly initialised model is the same in every worker and run
                torch.manual_seed(0)
                model = timm.create_model(spec[len("timm:"):], pretrained=pretrained, num_classes=0)
            config = resolve_data_config({"input_size": (3, image_size, image_size)} if image_size else {},
                                         model=model)
        else:
            from vfm.export import load_export
            from vfm.recipes.schema import AugmentConfig

            model, meta = load_export(spec)
            config = {"input_size": (3, image_size or meta.resolution, image_size or meta.resolution),
                      "crop_pct": meta.crop_pct, "mean": meta.mean, "std": meta.std,
                      # what evaluation of an export uses (vfm.evaluate.suite._data_config)
                      "interpolation": AugmentConfig().interpolation}
        if image_size and hasattr(model, "set_input_size"):
            model.set_input_size(img_size=(image_size, image_size))
        dim = getattr(model, "head_hidden_size", None) or model.num_features
        return cls(model.to(device), create_transform(**config, is_training=False), dim, device=device,
                   batch_size=batch_size)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from vfm.evaluate.knn import cls_features

        out = np.empty((len(images), self.dim), np.float32)
        # bf16 on a GPU (its tensor cores: ~15x fp32's peak on an H100); CPU stays fp32 (exact, and no faster in bf16)
        cuda = torch.device(self.device).type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            for start in range(0, len(images), self.batch_size):
                chunk = images[start:start + self.batch_size]
                x = torch.stack([self.transform(im.convert("RGB")) for im in chunk]).to(self.device)
                feats = F.normalize(cls_features(self.model, x).float(), dim=1)
                out[start:start + len(chunk)] = feats.cpu().numpy()
        return out


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(vectors: np.ndarray, *, kind: str = "auto", flat_max: int = 1_000_000, nlist: int | None = None,
                pq_m: int | None = None, nprobe: int = 16, seed: int = 0) -> faiss.Index:
    """An inner-product index of `vectors` (L2-normalised rows: inner product = cosine); labels = row positions.

    kind "flat": `IndexFlatIP`, exact. "ivfpq": `IVF{nlist},PQ{pq_m}x8` (nlist default ~ 4 sqrt(N), pq_m default
    dim / 8 rounded to a divisor of dim), trained on a sample of `min(N, max(64 nlist, 39 * 256))` rows drawn
    with `seed`, searched with `nprobe` lists. "auto": flat when N <= flat_max.

    Deterministic for the same input: the sample is seeded and so are faiss's k-means runs (the coarse quantizer's
    `cp.seed` and the PQ's `pq.cp.seed`). faiss's OpenMP threads split k-means and search over independent points
    and queries, so the thread count does not change the IVF-PQ index or its results (tests/curate/test_embed.py
    checks 1 vs 2 threads: identical search results and pairs). The flat index's BLAS inner products may differ in
    the last float bit with the thread count (measured: the same pairs, cosines 1 ulp apart), which could move
    only a pair within ~1e-7 of the threshold.
    """
    import faiss

    x = _f32(vectors)
    n, d = x.shape
    norms = np.linalg.norm(x[:1024], axis=1)
    if n and not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError(f"build_index needs L2-normalised rows (norms {norms.min():.3f}..{norms.max():.3f})")
    if kind == "auto":
        kind = "flat" if n <= flat_max else "ivfpq"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index
    if kind != "ivfpq":
        raise ValueError(f"kind must be auto, flat or ivfpq, not {kind!r}")
    nlist = nlist or max(1, round(4 * math.sqrt(n)))
    pq_m = pq_m or max(m for m in range(1, max(1, d // 8) + 1) if d % m == 0)
    if d % pq_m:
        raise ValueError(f"pq_m={pq_m} must divide the dimension {d}")
    index = faiss.index_factory(d, f"IVF{nlist},PQ{pq_m}x8", faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = index.pq.cp.seed = seed
    # index_factory turns on polysemous training (re-ordering codes for Hamming filtering, which we never use):
    # it takes longer than the whole k-means (10 s for 2000 vectors x 6 codes, 1 thread)
    index.do_polysemous_training = False
    train_n = min(n, max(64 * nlist, 39 * 256))
    sample = np.sort(np.random.default_rng(seed).choice(n, train_n, replace=False))
    index.train(x[sample])
    index.add(x)
    index.nprobe = nprobe
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int, *, batch: int = SEARCH_BATCH
           ) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` in batches of `batch` queries: (scores (nq, k) float32, labels (nq, k) int64; -1 = none)."""
    q = _f32(queries)
    scores, labels = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
    for s in range(0, len(q), batch):
        scores[s:s + batch], labels[s:s + batch] = index.search(q[s:s + batch], k)
    return scores, labels


def similar_pairs(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, *, threshold: float, k: int = 16,
                  exact_vectors: np.ndarray | None = None, index_ids: np.ndarray | None = None
                  ) -> list[tuple[int, int, float]]:
    """Pairs (id_a, id_b, cosine), id_a < id_b, cosine >= threshold, each once, sorted: the k nearest of each
    query row of `vectors` (whose ids are `ids`) in `index`, a query's own id left out.

    Index labels are row positions; `index_ids` maps them to ids (default: the positions are the ids, as for an
    index of the whole pool whose ids are row numbers; an index of another set, e.g. an eval set, gets ids
    disjoint from the pool's). An exact (flat) index gives exact cosines; any other index's candidates are
    re-ranked with the exact cosine against `exact_vectors[position]` (the indexed float32 rows, an array or a
    memmap), which is then required."""
    import faiss

    q, ids = _f32(vectors), np.asarray(ids, np.int64)
    exact = isinstance(index, faiss.IndexFlat)
    if not exact and exact_vectors is None:
        raise ValueError(f"{type(index).__name__} scores are approximate: pass exact_vectors to re-rank them")
    chunk = max(1, RERANK_FLOATS // max(1, k * q.shape[1]))
    a, b, s = [], [], []
    for start in range(0, len(q), chunk):
        qc, idc = q[start:start + chunk], ids[start:start + chunk]
        scores, pos = search(index, qc, k)
        valid = pos >= 0
        if not exact:
            cand = np.where(valid, pos, 0)
            rows = np.asarray(exact_vectors[cand.ravel()], np.float32).reshape(*cand.shape, -1)
            scores = np.einsum("nd,nkd->nk", qc, rows)
        other = np.asarray(index_ids, np.int64)[np.where(valid, pos, 0)] if index_ids is not None else pos
        keep = valid & (scores >= threshold) & (other != idc[:, None])
        mine = np.broadcast_to(idc[:, None], pos.shape)[keep]
        a.append(np.minimum(mine, other[keep]))
        b.append(np.maximum(mine, other[keep]))
        s.append(scores[keep])
    if not a:
        return []
    a, b, s = np.concatenate(a), np.concatenate(b), np.concatenate(s)
    order = np.lexsort((-s, b, a))  # by a, then b, best score first: keep the first of each (a, b)
    a, b, s = a[order], b[order], s[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return [(int(x), int(y), float(z)) for x, y, z in zip(a[first], b[first], s[first], strict=True)]


def retrieve(index: faiss.Index, seed_vectors: np.ndarray, k: int) -> np.ndarray:
    """Positions in `index` of the k nearest neighbours of each seed: unique, sorted (int64). DINOv2's retrieval
    step: the uncurated pool's images nearest to the curated seed images."""
    _, labels = search(index, seed_vectors, k)
    return np.unique(labels[labels >= 0])
