"""Near-duplicate search in Hamming space with multi-index hashing, and union-find over the found pairs.

Multi-index hashing (Norouzi, Punjani, Fleet, "Fast Search in Hamming Space with Multi-Index Hashing",
CVPR 2012): split each b-bit code into m disjoint chunks. If two codes are within Hamming distance D, their
m chunk distances sum to at most D, so by the pigeonhole principle at least one chunk differs in at most
r = D // m bits. Indexing every code under (chunk i, chunk value) and probing, for each code, every value
within radius r of each of its chunks therefore finds every pair within D; candidates are then verified
with the full distance. Cost is about N * m * sum_{k<=r} C(b/m, k) bucket look-ups plus the candidates,
instead of N^2 / 2 comparisons.

We use the same radius r for every chunk. The paper's tighter variant (with D = m*r + a, the first a+1
chunks at radius r and the rest at r-1) probes fewer keys; the simple form keeps one key space that a Ray
join over (index key == probe key) can use directly, which is what `mih_keys` is for.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from math import comb
from typing import Any

import numpy as np

# Beyond this many probe keys per code, MIH degenerates (chunks too wide for the radius); better to pick
# a smaller chunk_bits than to enumerate millions of keys per image.
MAX_PROBES_PER_CODE = 1 << 20
# Chunks up to this width are looked up in a dense table of bucket offsets (2**20 entries at most).
_DENSE_CHUNK_BITS = 20


def hamming(a: bytes, b: bytes) -> int:
    """Number of differing bits between two equal-length codes."""
    if len(a) != len(b):
        raise ValueError(f"hamming: codes of different lengths ({len(a)} and {len(b)} bytes)")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()


def _check(bits: int, max_distance: int, chunk_bits: int) -> tuple[int, int]:
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    if not 1 <= chunk_bits <= 32:
        raise ValueError(f"chunk_bits must be in 1..32, got {chunk_bits}")
    if bits == 0 or bits % chunk_bits:
        raise ValueError(f"chunk_bits={chunk_bits} does not divide the code length ({bits} bits)")
    m = bits // chunk_bits
    r = min(max_distance // m, chunk_bits)
    probes = m * sum(comb(chunk_bits, k) for k in range(r + 1))
    if probes > MAX_PROBES_PER_CODE:
        raise ValueError(f"max_distance={max_distance} with chunk_bits={chunk_bits} on {bits}-bit codes needs "
                         f"{probes} probe keys per code (radius {r} per chunk); use smaller chunks")
    return m, r


def _flip_masks(chunk_bits: int, r: int) -> list[int]:
    """Every chunk_bits-bit mask with at most r bits set (0 first)."""
    out = [0]
    for k in range(1, r + 1):
        for pos in itertools.combinations(range(chunk_bits), k):
            out.append(sum(1 << p for p in pos))
    return out


def mih_keys(h: bytes, max_distance: int, chunk_bits: int = 16) -> tuple[list[int], list[int]]:
    """(index keys, probe keys) of code `h` for a join that finds all pairs within `max_distance`.

    Chunk i (bits i*chunk_bits .. from the most significant end) with value v has index key
    (i << chunk_bits) | v; its probe keys are (i << chunk_bits) | v' for every v' within radius
    r = max_distance // m of v. Two codes within max_distance share a key: an index key of one equals a
    probe key of the other (the converse does not hold: shared keys are candidates to verify).
    """
    bits = 8 * len(h)
    m, r = _check(bits, max_distance, chunk_bits)
    x = int.from_bytes(h, "big")
    mask = (1 << chunk_bits) - 1
    flips = _flip_masks(chunk_bits, r)
    index, probe = [], []
    for i in range(m):
        v = (x >> (bits - (i + 1) * chunk_bits)) & mask
        base = i << chunk_bits
        index.append(base | v)
        probe.extend(base | (v ^ f) for f in flips)
    return index, probe


def _as_matrix(hashes: Sequence[bytes]) -> np.ndarray:
    if not hashes:
        return np.zeros((0, 0), np.uint8)
    n = len(hashes[0])
    if any(len(h) != n for h in hashes):
        raise ValueError("near_pairs: all codes must have the same length")
    return np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), n)


def _chunk_values(codes: np.ndarray, i: int, chunk_bits: int) -> np.ndarray:
    """Value of chunk i (MSB-first, as in mih_keys) of every code, as uint64."""
    lo, hi = i * chunk_bits, (i + 1) * chunk_bits
    b0, b1 = lo // 8, (hi + 7) // 8
    bits = np.unpackbits(codes[:, b0:b1], axis=1)[:, lo - 8 * b0: hi - 8 * b0]
    weights = (np.uint64(1) << np.arange(chunk_bits - 1, -1, -1, dtype=np.uint64))
    return (bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


def _words(codes: np.ndarray) -> np.ndarray:
    """The codes as 64-bit words when their length allows (popcount over 8x fewer elements)."""
    if codes.shape[1] % 8 == 0:
        return np.ascontiguousarray(codes).view(np.uint64)
    return codes


def _distances(words: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(words[a] ^ words[b]).sum(axis=1, dtype=np.int64)


def near_pairs(ids: list[int], hashes: list[bytes], max_distance: int,
               chunk_bits: int = 16) -> list[tuple[int, int, int]]:
    """Every pair within `max_distance` exactly once, as (id_a, id_b, distance) with id_a < id_b, sorted.

    A vectorised reference of the multi-index search (for one Ray group of codes, and for tests): per
    chunk, codes are sorted by chunk value and each code's probe values are looked up in a table of
    bucket offsets (searchsorted for chunks wider than 20 bits); candidates are verified on the full code
    at once, so memory follows the candidates of one (chunk, flip mask) step, not N^2.

    Cost grows with the candidates, about N * probes * N / 2**chunk_bits: the paper's advice is
    chunk_bits ~ log2(N). Many identical codes make every step quadratic (the output is too, as every
    pair is listed): collapse equal codes first when a group may hold thousands of them.
    """
    if len(ids) != len(hashes):
        raise ValueError(f"near_pairs: {len(ids)} ids but {len(hashes)} hashes")
    if len(set(ids)) != len(ids):
        raise ValueError("near_pairs: ids must be unique")
    if len(ids) < 2:
        return []
    codes = _as_matrix(hashes)
    m, r = _check(8 * codes.shape[1], max_distance, chunk_bits)
    n = len(ids)
    flips = np.array(_flip_masks(chunk_bits, r), np.int64)
    words = _words(codes)
    found_a: list[np.ndarray] = []
    found_b: list[np.ndarray] = []
    found_d: list[np.ndarray] = []
    dense = chunk_bits <= _DENSE_CHUNK_BITS
    for i in range(m):
        vals = _chunk_values(codes, i, chunk_bits).astype(np.int64)
        order = np.argsort(vals, kind="stable")
        sorted_vals = vals[order]
        if dense:
            # bucket offsets in a table over all 2**chunk_bits values: a probe is two gathers instead of
            # two binary searches (~5x faster for 16-bit chunks)
            table_counts = np.bincount(vals, minlength=1 << chunk_bits)
            table_start = np.concatenate(([0], np.cumsum(table_counts)[:-1]))
        for f in flips:
            probe = vals ^ f
            if dense:
                counts = table_counts[probe]
                if not counts.any():
                    continue
                lo = table_start[probe]
            else:
                lo = np.searchsorted(sorted_vals, probe, "left")
                counts = np.searchsorted(sorted_vals, probe, "right") - lo
            total = int(counts.sum())
            if total == 0:
                continue
            a = np.repeat(np.arange(n), counts)
            # positions lo[a] .. hi[a]-1 of every probing code, flattened
            starts = np.repeat(lo - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
            b = order[starts + np.arange(total)]
            # (a, b) and (b, a) are both found (the flip is symmetric), and a == b when f == 0: keep a < b
            keep = a < b
            a, b = a[keep], b[keep]
            d = _distances(words, a, b)
            ok = d <= max_distance
            found_a.append(a[ok])
            found_b.append(b[ok])
            found_d.append(d[ok])
    if not found_a:
        return []
    a = np.concatenate(found_a)
    b = np.concatenate(found_b)
    d = np.concatenate(found_d)
    # a pair close in several chunks is found once per such chunk: keep one
    _, first = np.unique(a.astype(np.int64) * n + b, return_index=True)
    ids_arr = np.asarray(ids)
    out = []
    for k in first:
        x, y = int(ids_arr[a[k]]), int(ids_arr[b[k]])
        out.append((min(x, y), max(x, y), int(d[k])))
    out.sort()
    return out


def components(n_or_ids: int | Iterable[int], pairs: Iterable[Sequence[int]],
               priority: Mapping[int, Any] | Callable[[int], Any] | None = None) -> dict[int, int]:
    """Union-find over `pairs` ((a, b) or (a, b, distance)): id -> representative of its component.

    The representative is the smallest id of the component, or with `priority` the id with the smallest
    priority key (a mapping or a function of the id, e.g. -(width*height) to keep the largest copy), ties
    broken by the smaller id. Ids not in any pair are their own representative.
    """
    ids = list(range(n_or_ids)) if isinstance(n_or_ids, int) else list(n_or_ids)
    parent = {i: i for i in ids}

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for p in pairs:
        a, b = p[0], p[1]
        if a not in parent or b not in parent:
            raise KeyError(f"components: pair {(a, b)} names an id that is not in the id set")
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    if priority is None:
        key: Callable[[int], Any] = lambda i: i  # noqa: E731
    else:
        get = priority.__getitem__ if isinstance(priority, Mapping) else priority
        key = lambda i: (get(i), i)  # noqa: E731
    best: dict[int, int] = {}
    for i in ids:
        root = find(i)
        if root not in best or key(i) < key(best[root]):
            best[root] = i
    return {i: best[find(i)] for i in ids}


# Default near-duplicate radii for the 64-bit (hash_size=8) codes of vfm.curate.quality.analyze; a pair is
# a near duplicate when either code is within its radius. pHash (DCT signs) survives re-encoding, resizing
# and colour shifts but moves 8-24 bits under an opaque strip over the bottom of the image; dHash (signs of
# horizontal gradients) moves 0-6 bits under that strip. On the planted pool (tests/helpers/curate_data.py,
# 12 seeds x 60 originals, 68,760 non-duplicate pairs) the closest distinct images were 12 bits apart in
# pHash and 11 in dHash, so 10 / 8 keep 2-3 bits of margin; see tests/curate/test_quality_hashing.py.
PHASH_MAX_DISTANCE = 10
DHASH_MAX_DISTANCE = 6
