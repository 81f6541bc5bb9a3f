"""`vfm curate` on Ray Data: raw image pools → quality filter → decontamination → exact, near and embedding dedup
(→ retrieval) → WebDataset shards + manifest, in the format `vfm shard` writes, unlabelled.

    analyse  (Ray Data, one task per part of `curate.part_size` images; each commits its features to
              `<dest>/_curate/parts/<settings>/<source>-<first entry>.parquet`, so a rerun skips committed parts)
       │      decode (vfm.curate.quality.analyze), quality reason, pixel sha256, pHash/dHash, embedding
    pairs    (Ray Data groupby: images sharing a pixel hash, and multi-index-hashing buckets of their perceptual hashes,
       │      vfm.curate.hashing; embedding neighbours: faiss search of batches against one index, vfm.curate.embed)
    decide   (the driver: per stage, the connected components of its pairs keep their first image)
    write    (Ray Data, one task per planned shard: vfm.data.shard.write_dataset's plan, resume and manifest)

Every decision is a pure function of the committed features, the settings and the seed, and ties are broken by the
image's id (its source's rank by weight, then its position in the source), never by arrival order, so 1 or N Ray
workers, and a run killed and rerun, write byte-identical shards and manifest. Each image removed is recorded in
`<dest>/_curate/decisions.parquet` with its stage, reason and the image it duplicates; nothing is lost silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vfm import storage
from vfm.data.manifest import MANIFEST_NAME, Manifest
from vfm.data.shard import UNLABELLED, parse_size, plan_shards, write_dataset, write_planned_shard
from vfm.data.sources import SourceIndex, sample_key
from vfm.errors import UserError

ID_SHIFT = 40  # id = (source rank << ID_SHIFT) | entry: 2^40 entries a source, ranks in priority order
WORK_DIR = "_curate"
DECISIONS = f"{WORK_DIR}/decisions.parquet"
REPORT = f"{WORK_DIR}/report.json"
# reliability tests set this to SIGKILL the driver once N parts are committed (the kill-and-rerun check): the Ray task
# that commits the Nth part kills the driver, then itself, so that at most N + workers - 1 parts are committed whatever
# the timing (local Ray only: the driver's pid is this machine's)
FAULT_KILL_ENV = "VFM_FAULT_KILL_AFTER_PARTS"
STAGES = ("decode", "quality", "decontaminate", "exact", "near", "embedding", "retrieval")


@dataclass
class Input:
    """One indexed source: `rank` orders sources by priority (heavier weight first, then as listed)."""

    config: Any  # vfm.recipes.schema.CurateSource
    index: SourceIndex
    rank: int
    eval: bool = False

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class Part:
    rank: int
    start: int
    stop: int
    name: str


@dataclass
class CurateResult:
    manifest: Manifest
    report: dict[str, Any]
    resumed_parts: int = 0
    analysed_parts: int = 0
    decisions: Any = None  # the pyarrow table of removed images
    examples: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    inputs: list[Input] = field(default_factory=list)


def load_inputs(cfg: Any, raw_root: str = "", progress: Callable[[str], None] = lambda _m: None) -> list[Input]:
    """Index every source (pool first by priority, then the evaluation sets of decontamination)."""
    from vfm.curate.inputs import index_curate_source

    order = sorted(range(len(cfg.sources)), key=lambda i: (-cfg.sources[i].weight, i))
    inputs = [Input(cfg.sources[i], index_curate_source(cfg.sources[i], raw_root, progress), rank)
              for rank, i in enumerate(order)]
    if cfg.decontaminate.enabled:
        for s in cfg.decontaminate.sets:
            inputs.append(Input(s, index_curate_source(s, raw_root, progress), len(inputs), eval=True))
    return inputs


def analysis_settings(cfg: Any) -> dict[str, Any]:
    """What a part's features depend on; their digest names the parts' folder, so other settings analyse anew."""
    emb = cfg.embedding
    embed_needed = emb.enabled
    return {"quality": cfg.quality.model_dump(), "hash_size": cfg.near.hash_size,
            "embedding": {"model": emb.model, "image_size": emb.image_size} if embed_needed else None, "version": 1}


def output_digest(cfg: Any) -> str:
    """What the output depends on: every setting but where and how wide it runs."""
    return settings_digest(cfg.model_dump(mode="json", exclude={"workers", "cpus_per_worker", "gpus_per_worker",
                                                                 "memory_per_worker", "part_size"}))


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def plan_parts(inputs: list[Input], part_size: int) -> list[Part]:
    return [Part(inp.rank, start, min(start + part_size, len(inp.index)), f"{inp.name}-{start:012d}")
            for inp in inputs for start in range(0, len(inp.index), part_size)]


# --- analyse ------------------------------------------------------------------------------------------
class _Analyse:
    """Ray Data UDF: one part per call → its features committed as one parquet object. An actor keeps its embedding
    model (loaded once) and the sources' indexes."""

    def __init__(self, inputs_ref: Any, parts: list[Part], parts_url: str, settings: dict[str, Any],
                 thresholds: Any, endpoint_url: str | None, kill_after: int = 0, driver_pid: int = 0):
        import ray

        self.inputs = {inp.rank: inp for inp in (ray.get(inputs_ref) if isinstance(inputs_ref, ray.ObjectRef)
                                                 else inputs_ref)}
        self.parts, self.parts_url, self.settings = parts, parts_url, settings
        self.thresholds, self.endpoint_url = thresholds, endpoint_url
        self.kill_after, self.driver_pid = kill_after, driver_pid
        storage.forget_clients()  # this actor makes its own S3 connections
        self.embedder = None
        if settings["embedding"]:
            import torch

            from vfm.curate.embed import Embedder

            spec = settings["embedding"]["model"]
            self.embedder = Embedder.from_spec(spec, image_size=settings["embedding"]["image_size"],
                                               device="cuda" if torch.cuda.is_available() else "cpu",
                                               # `timm:<name>.<tag>` loads the tag's weights; a bare name is random
                                               pretrained=not spec.startswith("timm:") or "." in spec[5:])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [self.analyse(self.parts[int(p)]) for p in batch["part"]]
        return {"part": batch["part"], "images": np.array(done, dtype=np.int64)}

    def analyse(self, part: Part) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from vfm.curate.quality import analyze, quality_reason

        inp = self.inputs[part.rank]
        index = inp.index
        rows: dict[str, list] = {k: [] for k in ("id", "status", "quality", "width", "height", "bytes", "sha",
                                                 "entropy", "laplacian", "grayscale", "phash", "dhash", "ext")}
        to_embed: list[tuple[int, bytes]] = []
        with index.reading() as read:
            for e in range(part.start, part.stop):
                try:
                    data = read(e)
                except Exception as exc:  # a damaged member or a vanished object: reported, the part goes on
                    f: Any = f"unreadable: {exc}"
                else:
                    f = analyze(data, index.name(e), hash_size=self.settings["hash_size"])
                rows["id"].append((part.rank << ID_SHIFT) | e)
                if isinstance(f, str):
                    rows["status"].append(f)
                    for k, empty in (("quality", ""), ("width", 0), ("height", 0), ("bytes", 0), ("sha", ""),
                                     ("entropy", 0.0), ("laplacian", 0.0), ("grayscale", False), ("phash", b""),
                                     ("dhash", b""), ("ext", "")):
                        rows[k].append(empty)
                    continue
                rows["status"].append("ok")
                rows["quality"].append(quality_reason(f, self.thresholds) or "")
                for k, v in (("width", f.width), ("height", f.height), ("bytes", f.bytes), ("sha", f.pixel_sha256),
                             ("entropy", f.entropy), ("laplacian", f.laplacian_var), ("grayscale", f.grayscale),
                             ("phash", f.phash), ("dhash", f.dhash), ("ext", f.ext)):
                    rows[k].append(v)
                if self.embedder is not None:
                    to_embed.append((len(rows["id"]) - 1, data))
        table = pa.table(rows)
        if self.embedder is not None:
            table = table.append_column("embedding", pa.array(self._embed(to_embed, len(rows["id"])),
                                                              type=pa.list_(pa.float32())))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        # the part's commit: one object written whole (an S3 PUT, a rename locally), so a part exists complete or not
        storage.write_bytes(storage.join(self.parts_url, part.name + ".parquet"), buf.getvalue(), self.endpoint_url)
        if self.kill_after and len(_committed(self.parts_url, self.endpoint_url)) >= self.kill_after:
            os.kill(self.driver_pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return len(rows["id"])

    def _embed(self, items: list[tuple[int, bytes]], n: int) -> list[list[float] | None]:
        from PIL import Image

        out: list[list[float] | None] = [None] * n
        batch = 64
        for s in range(0, len(items), batch):
            chunk = items[s:s + batch]
            images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in chunk]
            vectors = self.embedder(images)
            for (row, _), v in zip(chunk, vectors, strict=True):
                out[row] = v.tolist()
        return out


def _committed(parts_url: str, endpoint_url: str | None) -> set[str]:
    base = parts_url.rstrip("/") + "/"
    return {u[len(base):].removesuffix(".parquet") for u in storage.list_prefix(parts_url, endpoint_url)
            if u.endswith(".parquet")}


def analyse(inputs: list[Input], parts: list[Part], parts_url: str, settings: dict[str, Any], thresholds: Any, *,
            workers: int, gpus_per_task: float, endpoint_url: str | None,
            progress: Callable[[int, int], None]) -> tuple[int, int]:
    """Analyse every part not yet committed; returns (parts resumed, parts analysed)."""
    import ray

    done = _committed(parts_url, endpoint_url)
    todo = [i for i, p in enumerate(parts) if p.name not in done]
    resumed = len(parts) - len(todo)
    progress(resumed, len(parts))
    if not todo:
        return resumed, 0
    kill_after = int(os.environ.get(FAULT_KILL_ENV, "0") or 0)
    ds = ray.data.from_items([{"part": i} for i in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(_Analyse, batch_size=1, compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(todo)))),
                        num_cpus=1,
                        num_gpus=gpus_per_task or None,
                        fn_constructor_kwargs=dict(inputs_ref=ray.put(inputs), parts=parts, parts_url=parts_url,
                                                   settings=settings, thresholds=thresholds,
                                                   endpoint_url=endpoint_url, kill_after=kill_after,
                                                   driver_pid=os.getpid()))
    analysed = 0
    for _row in ds.iter_rows():
        analysed += 1
        progress(resumed + analysed, len(parts))
    return resumed, analysed


def read_features(parts: list[Part], parts_url: str, endpoint_url: str | None) -> Any:
    """Every part's features, in id order (the parts are in id order, and so are the rows of each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def read(p: Part) -> Any:
        return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(parts_url, p.name + ".parquet"),
                                                           endpoint_url)))

    with ThreadPoolExecutor(16) as pool:
        tables = list(pool.map(read, parts))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default")


# --- pairs ----------------------------------------------------------------------------------------------
HASH_KINDS = ("phash", "dhash")


def _hash_keys(batch: dict[str, np.ndarray], reach: dict[str, int], chunk_bits: int) -> dict[str, np.ndarray]:
    """Rows (key, id, hash, probe) of each image: its pixel hash (`s:`), and for each perceptual hash within `reach`
    its multi-index-hashing index keys and probe keys (`p:` / `d:`); a probe row meets the index rows of its bucket
    in one group."""
    from vfm.curate.hashing import mih_keys

    keys, ids, hashes, probe = [], [], [], []

    def row(key: str, i: int, h: bytes, is_probe: bool) -> None:
        keys.append(key)
        ids.append(i)
        hashes.append(h)
        probe.append(is_probe)

    for j, i in enumerate(batch["id"]):
        row(f"s:{batch['sha'][j]}", i, b"", False)
        for kind, t in reach.items():
            h = bytes(batch[kind][j])
            index_keys, probe_keys = mih_keys(h, t, chunk_bits)
            for k in index_keys:
                row(f"{kind[0]}:{k}", i, h, False)
            for k in set(probe_keys) - set(index_keys):
                row(f"{kind[0]}:{k}", i, h, True)
    return {"key": np.array(keys, dtype=object), "id": np.array(ids, dtype=np.int64),
            "hash": np.array(hashes, dtype=object), "probe": np.array(probe, dtype=bool)}


def _group_pairs(group: dict[str, np.ndarray], reach: dict[str, int]) -> dict[str, np.ndarray]:
    """Pairs (a < b, distance; -1 for the same pixels) in one group: every pair of a pixel-hash group (a star
    around its smallest id: enough for connected components); in a multi-index bucket, each index row with every
    other row of the bucket within the hash's distance (one vectorised popcount)."""
    ids, probe = group["id"].astype(np.int64), group["probe"]
    empty = {"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64), "d": np.zeros(0, np.int64)}
    if len(ids) < 2:
        return empty
    kind = str(group["key"][0])[0]
    if kind == "s":
        order = np.sort(ids)
        return {"a": np.full(len(order) - 1, order[0]), "b": order[1:], "d": np.full(len(order) - 1, -1)}
    limit = reach["phash" if kind == "p" else "dhash"]
    codes = np.frombuffer(b"".join(bytes(h) for h in group["hash"]), np.uint8).reshape(len(ids), -1)
    x = np.flatnonzero(~probe)
    dist = np.unpackbits(codes[x][:, None, :] ^ codes[None, :, :], axis=2).sum(axis=2)  # |index rows| × |group|
    xi, y = np.nonzero(dist <= limit)
    a, b = ids[x[xi]], ids[y]
    # an index-index pair is met twice (either side): keep it from its first row; never an image with itself
    keep = (a != b) & (probe[y] | (x[xi] < y))
    a, b, d = a[keep], b[keep], dist[xi, y][keep]
    return {"a": np.minimum(a, b), "b": np.maximum(a, b), "d": d.astype(np.int64)}


def hash_pairs(ids: np.ndarray, shas: np.ndarray, hashes: dict[str, np.ndarray], *, reach: dict[str, int],
               chunk_bits: int, partitions: int) -> np.ndarray:
    """(a, b, distance) rows, unique and sorted, of images with the same pixels (distance -1) or a perceptual hash
    within its `reach` (kind → bits; {} for pixel pairs only), through one Ray Data shuffle."""
    import ray

    if not len(ids):
        return np.zeros((0, 3), np.int64)
    rows = [{"id": int(i), "sha": str(s), **{k: bytes(hashes[k][j]) for k in reach}}
            for j, (i, s) in enumerate(zip(ids, shas, strict=True))]
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(_hash_keys, batch_format="numpy", fn_kwargs=dict(reach=reach, chunk_bits=chunk_bits))
    ds = ds.groupby("key", num_partitions=partitions).map_groups(_group_pairs, batch_format="numpy",
                                                                  fn_kwargs=dict(reach=reach))
    found = [(r["a"], r["b"], r["d"]) for r in ds.iter_rows()]
    if not found:
        return np.zeros((0, 3), np.int64)
    pairs = np.array(found, dtype=np.int64)
    # the same pair from several buckets: keep it once, with its smallest distance (-1: same pixels)
    pairs = pairs[np.lexsort((pairs[:, 2], pairs[:, 1], pairs[:, 0]))]
    keep = np.ones(len(pairs), bool)
    keep[1:] = (pairs[1:, 0] != pairs[:-1, 0]) | (pairs[1:, 1] != pairs[:-1, 1])
    return pairs[keep]


class _Search:
    """Ray Data UDF: the pairs above a cosine threshold between a batch of query vectors and one faiss index
    (deserialised once per actor), through vfm.curate.embed.similar_pairs (IVF-PQ re-ranked with exact vectors)."""

    def __init__(self, index_ref: Any, index_ids: np.ndarray, index_vectors_ref: Any, k: int, threshold: float):
        import faiss
        import ray

        self.index = faiss.deserialize_index(ray.get(index_ref))
        self.exact = ray.get(index_vectors_ref)
        self.index_ids, self.k, self.threshold = index_ids, k, threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vfm.curate.embed import similar_pairs

        pairs = similar_pairs(self.index, np.stack(batch["embedding"]).astype(np.float32), batch["id"],
                              threshold=self.threshold, k=min(self.k, self.index.ntotal), exact_vectors=self.exact,
                              index_ids=self.index_ids)
        return {"a": np.array([p[0] for p in pairs], np.int64), "b": np.array([p[1] for p in pairs], np.int64)}


def embedding_pairs(index_ids: np.ndarray, index_vectors: np.ndarray, query_ids: np.ndarray,
                    query_vectors: np.ndarray, *, threshold: float, k: int, kind: str, seed: int,
                    workers: int = 1) -> np.ndarray:
    """(a, b) pairs, unique and sorted, with cosine ≥ threshold between the queries and the index's vectors: one
    faiss index (vfm.curate.embed.build_index), the queries searched against it in Ray Data batches by `workers`
    actors, each with a replica of the index from the object store."""
    import faiss
    import ray

    from vfm.curate.embed import build_index

    if not len(index_ids) or not len(query_ids):
        return np.zeros((0, 2), np.int64)
    index = build_index(index_vectors, kind=kind, seed=seed)
    ds = ray.data.from_items([{"id": int(i), "embedding": v} for i, v in zip(query_ids, query_vectors, strict=True)])
    actors = max(1, min(workers, -(-len(query_ids) // 4096)))
    ds = ds.map_batches(_Search, batch_format="numpy", batch_size=4096, compute=ray.data.ActorPoolStrategy(size=actors),
                        fn_constructor_kwargs=dict(index_ref=ray.put(faiss.serialize_index(index)),
                                                   index_ids=index_ids, index_vectors_ref=ray.put(index_vectors),
                                                   k=k, threshold=threshold))
    rows = sorted({(r["a"], r["b"]) for r in ds.iter_rows()})
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


# --- decide -----------------------------------------------------------------------------------------------
@dataclass
class Decisions:
    """Per image (row of the features table): the stage that removed it ("" kept), why, and the image it copies."""

    ids: np.ndarray
    stage: np.ndarray = field(init=False)
    reason: np.ndarray = field(init=False)
    of: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.ids)
        self.stage = np.full(n, "", dtype=object)
        self.reason = np.full(n, "", dtype=object)
        self.of = np.full(n, -1, dtype=np.int64)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, ids)

    def remove(self, rows: np.ndarray, stage: str, reason: str | np.ndarray, of: np.ndarray | None = None) -> None:
        first = self.stage[rows] == ""  # the first stage to remove an image is the one that counts
        rows = rows[first]
        self.stage[rows] = stage
        self.reason[rows] = reason if isinstance(reason, str) else np.asarray(reason)[first]
        if of is not None:
            self.of[rows] = np.asarray(of)[first]

    @property
    def alive(self) -> np.ndarray:
        return self.stage == ""


def drop_duplicates(dec: Decisions, pairs: np.ndarray, stage: str, reason: str, candidates: np.ndarray) -> list:
    """Among the alive `candidates` rows, the connected components of `pairs` (ids) keep their first image (the
    smallest id: the heaviest source, then the earliest entry); the rest are removed as copies of it."""
    from vfm.curate.hashing import components

    if not len(pairs):
        return []
    alive_ids = set(dec.ids[candidates[dec.alive[candidates]]].tolist())
    edges = [(int(a), int(b)) for a, b in pairs[:, :2] if int(a) in alive_ids and int(b) in alive_ids]
    if not edges:
        return []
    rep = components(sorted({x for e in edges for x in e}), edges)
    dups = np.array(sorted(i for i, r in rep.items() if r != i), dtype=np.int64)
    if len(dups):
        dec.remove(dec.rows(dups), stage, reason, np.array([rep[int(i)] for i in dups], np.int64))
    return [(rep[int(i)], int(i)) for i in dups]


def copies(ids: np.ndarray, weights: np.ndarray, seed: int) -> np.ndarray:
    """How many times each kept image is written: floor(weight), plus one more with probability frac(weight),
    drawn from a hash of (seed, id) so that it does not depend on the run's order or workers."""
    base = np.floor(weights).astype(np.int64)
    frac = weights - base
    u = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") / 2**64 for i in ids])
    return base + (u < frac)


# --- the whole run ------------------------------------------------------------------------------------------
def curate(cfg: Any, dest: str, *, raw_root: str = "", workers: int | None = None, endpoint_url: str | None = None,
           log: Callable[[str], None] = print, progress: Callable[[str, int, int], None] = lambda *_: None,
           ) -> CurateResult:
    """Run `cfg` (a vfm.recipes.schema.CurateConfig) to `dest` on the Ray cluster this process is connected to
    (`ray_session`); resumable; returns the manifest and the report (vfm.curate.report writes it to MLflow)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("curate runs inside vfm.curate.ray_session(); start Ray first")
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    run_digest = output_digest(cfg)
    done = already_complete(dest, run_digest, endpoint_url)
    if done is not None:
        log(f"{done.location}: already complete ({done.num_samples:,} images in {len(done.shards)} shards); nothing "
            "to do")
        report = json.loads(storage.read_bytes(storage.join(dest, REPORT), endpoint_url))
        return CurateResult(done, report)
    inputs = load_inputs(cfg, raw_root, lambda m: log(f"index: {m}"))
    by_rank = {inp.rank: inp for inp in inputs}
    settings = analysis_settings(cfg)
    digest = settings_digest(settings)
    parts_url = storage.join(dest, f"{WORK_DIR}/parts/{digest}")
    parts = plan_parts(inputs, cfg.part_size)
    thresholds = cfg.quality
    total = sum(len(inp.index) for inp in inputs)
    log(f"{total:,} images in {len(inputs)} sources ({', '.join(f'{i.name}: {len(i.index):,}' for i in inputs)}), "
        f"{len(parts)} parts of ≤ {cfg.part_size}, {workers} Ray workers")
    # each analysis task's share of its worker's GPUs (the embedding model); none where the Ray cluster has no GPU
    # (this machine), or the tasks would wait for one forever
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    gpus = cfg.gpus_per_worker / cfg.cpus_per_worker if cfg.gpus_per_worker and cfg.embedding.enabled and has_gpus else 0.0
    if cfg.gpus_per_worker and cfg.embedding.enabled and not has_gpus:
        log(f"curate.gpus_per_worker={cfg.gpus_per_worker} but this Ray cluster has no GPU: embedding on the CPUs")
    resumed, analysed = analyse(inputs, parts, parts_url, settings, thresholds, workers=workers, gpus_per_task=gpus,
                                endpoint_url=endpoint_url, progress=lambda d, n: progress("analyse", d, n))
    log(f"analysed {analysed} parts, {resumed} committed by an earlier run")
    table = read_features(parts, parts_url, endpoint_url)
    result = decide_and_write(cfg, dest, inputs, by_rank, table, workers=workers, endpoint_url=endpoint_url, log=log,
                              progress=progress, digest=run_digest)
    result.resumed_parts, result.analysed_parts = resumed, analysed
    return result


def decide_and_write(cfg: Any, dest: str, inputs: list[Input], by_rank: dict[int, Input], table: Any, *, workers: int,
                     endpoint_url: str | None, log: Callable[[str], None], progress: Callable[[str, int, int], None],
                     digest: str) -> CurateResult:
    import pyarrow as pa

    cols = {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names if k != "embedding"}
    ids = cols["id"].astype(np.int64)
    dec = Decisions(ids)
    rank = ids >> ID_SHIFT
    is_eval = np.array([by_rank[int(r)].eval for r in rank], dtype=bool) if len(ids) else np.zeros(0, bool)
    pool = np.flatnonzero(~is_eval)
    ok = cols["status"] == "ok"
    examples: dict[str, list[tuple[int, int]]] = {}

    # 1. decode: what does not decode is skipped and reported, as `vfm shard` does
    bad = pool[~ok[pool]]
    dec.remove(bad, "decode", cols["status"][bad])
    # 1. quality
    if cfg.quality.enabled:
        failing = pool[ok[pool] & (cols["quality"][pool] != "")]
        dec.remove(failing, "quality", cols["quality"][failing])
    near_on = cfg.near.enabled or cfg.decontaminate.enabled  # decontamination uses the near stage's distances
    reach = {k: t for k, t in (("phash", cfg.near.phash_max_distance), ("dhash", cfg.near.dhash_max_distance))
             if near_on and t >= 0}
    pairs = np.zeros((0, 3), np.int64)
    if cfg.exact.enabled or near_on:
        rows = np.flatnonzero(dec.alive & ok)  # alive pool images and the evaluation images (never removed)
        log(f"pairs: pixel and perceptual hashes of {len(rows):,} images")
        pairs = hash_pairs(ids[rows], cols["sha"][rows], {k: cols[k][rows] for k in reach}, reach=reach,
                           chunk_bits=cfg.near.chunk_bits, partitions=max(2, min(64, workers * 2)))
    emb = None
    if cfg.embedding.enabled:
        vectors = table.column("embedding").to_pylist()  # None where the image did not decode
        emb = np.zeros((len(ids), next((len(v) for v in vectors if v is not None), 0)), np.float32)
        for i, v in enumerate(vectors):
            if v is not None:
                emb[i] = v

    # 5. decontamination first: a copy of an evaluation image must not survive as the kept copy of a group
    if cfg.decontaminate.enabled:
        eval_ids = set(ids[is_eval].tolist())

        def against_eval(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            hit = np.array([(int(a) in eval_ids) != (int(b) in eval_ids) for a, b in p[:, :2]], bool) if len(p) else \
                np.zeros(0, bool)
            p = p[hit]
            pool_id = np.where(np.isin(p[:, 0], list(eval_ids)), p[:, 1], p[:, 0])
            eval_id = np.where(np.isin(p[:, 0], list(eval_ids)), p[:, 0], p[:, 1])
            return pool_id, eval_id

        for kind, sel in (("exact_copy_of_eval", pairs[:, 2] < 0), ("near_copy_of_eval", pairs[:, 2] >= 0)):
            pid, eid = against_eval(pairs[sel])
            dec.remove(dec.rows(pid), "decontaminate", kind, eid)
        if emb is not None:
            qrows = pool[dec.alive[pool]]
            erows = np.flatnonzero(is_eval & ok)
            p = embedding_pairs(ids[erows], emb[erows], ids[qrows], emb[qrows], threshold=cfg.decontaminate.threshold,
                                k=1, kind="flat", seed=cfg.seed, workers=workers)
            pid, eid = against_eval(np.column_stack([p, np.zeros(len(p), np.int64)]) if len(p) else
                                    np.zeros((0, 3), np.int64))
            dec.remove(dec.rows(pid), "decontaminate", "embedding_copy_of_eval", eid)
        removed = np.flatnonzero(dec.stage == "decontaminate")
        examples["decontaminate"] = [(int(dec.of[r]), int(ids[r])) for r in removed[:8]]
    # 2. exact
    if cfg.exact.enabled:
        examples["exact"] = drop_duplicates(dec, pairs[pairs[:, 2] < 0], "exact", "same_pixels", pool)[:8]
    # 3. near
    if cfg.near.enabled:
        why = " or ".join(f"{k}_within_{t}" for k, t in reach.items())
        examples["near"] = drop_duplicates(dec, pairs[pairs[:, 2] >= 0], "near", why, pool)[:8]
    # 4. embedding dedup, then retrieval around the seed sets
    if emb is not None:
        alive = pool[dec.alive[pool]]
        log(f"embedding: {len(alive):,} vectors, cosine ≥ {cfg.embedding.threshold}, k = {cfg.embedding.k}")
        p = embedding_pairs(ids[alive], emb[alive], ids[alive], emb[alive], threshold=cfg.embedding.threshold,
                            k=cfg.embedding.k, kind=cfg.embedding.index, seed=cfg.seed, workers=workers)
        examples["embedding"] = drop_duplicates(dec, p, "embedding", f"cosine_at_least_{cfg.embedding.threshold}",
                                                pool)[:8]
        if cfg.embedding.retrieval_k:
            from vfm.curate.embed import build_index, retrieve

            alive = pool[dec.alive[pool]]
            seed_rows = alive[np.array([by_rank[int(r)].config.seed_set for r in rank[alive]], bool)]
            other = np.setdiff1d(alive, seed_rows)
            if len(seed_rows) and len(other):
                got = retrieve(build_index(emb[other], kind=cfg.embedding.index, seed=cfg.seed), emb[seed_rows],
                               cfg.embedding.retrieval_k)
                dec.remove(np.setdiff1d(other, other[got]), "retrieval", "not_among_seed_neighbours")

    # output: the kept images, each written as often as its source's weight says
    kept = pool[dec.alive[pool]]
    weights = np.array([by_rank[int(r)].config.weight for r in rank[kept]], np.float64)
    n_copies = copies(ids[kept], weights, cfg.seed)
    out = SourceIndex(dataset=cfg.dataset, classes=[], task=UNLABELLED)
    file_base: dict[int, int] = {}
    for inp in inputs:
        if not inp.eval:
            file_base[inp.rank] = len(out.files)
            out.files.extend(inp.index.files)
    for row, c in zip(kept.tolist(), n_copies.tolist(), strict=True):
        r, e = int(rank[row]), int(ids[row] & ((1 << ID_SHIFT) - 1))
        inp = by_rank[r]
        name = inp.index.name(e)
        for k in range(c):
            # keys unique across sources and copies: a WebDataset reader groups consecutive members by key
            key = sample_key(f"{inp.name}/{name}") + (f"_copy{k}" if k else "")
            meta = {"source": inp.name, "name": name, "id": int(ids[row])}
            out.add_dense(file_base[r] + inp.index.file_id[e], inp.index.offset[e], inp.index.size[e], name,
                          codec=inp.index.codec[e] if len(inp.index.codec) else 0,
                          payload=json.dumps(meta, sort_keys=True).encode(), key=key)
    # skipped inputs are reported in the manifest, as `vfm shard` reports them
    for inp in inputs:
        if not inp.eval:
            out.failures.extend({**f, "source": inp.name} for f in inp.index.failures)
    for row in np.flatnonzero(dec.stage == "decode"):
        inp = by_rank[int(rank[row])]
        name = inp.index.name(int(ids[row] & ((1 << ID_SHIFT) - 1)))
        out.failures.append({"key": sample_key(f"{inp.name}/{name}"), "name": name, "source": inp.name,
                             "reason": str(dec.reason[row]), "action": "skipped"})
    log(f"writing {len(out):,} images ({len(kept):,} kept of {len(pool):,}) to {dest}")
    report = build_report(cfg, inputs, by_rank, dec, is_eval, len(out), digest)
    plan = plan_shards(out, cfg.seed, parse_size(cfg.shard_size), cfg.dataset)
    progress("write", 0, len(plan))
    shard_report = write_dataset(out, dest, split="train", seed=cfg.seed, shard_size=parse_size(cfg.shard_size),
                                 endpoint_url=endpoint_url, source=f"vfm curate (settings {digest})",
                                 runner=_ray_runner(workers), verify="header",
                                 on_shard=lambda _r: progress("write", 1, len(plan)))
    if shard_report.manifest is None:
        raise RuntimeError(f"{dest}: {shard_report.remaining} shards were not written; rerun to complete them")
    removed = np.flatnonzero((dec.stage != "") & ~is_eval)
    # what the index pass rejected (zero bytes, listed but missing) has no id: -1
    unindexed = [(inp.name, f["name"], f["reason"]) for inp in inputs if not inp.eval for f in inp.index.failures]
    decisions = pa.table({
        "id": np.concatenate([ids[removed], np.full(len(unindexed), -1, np.int64)]),
        "source": [by_rank[int(r)].name for r in rank[removed]] + [u[0] for u in unindexed],
        "name": [by_rank[int(r)].index.name(int(i & ((1 << ID_SHIFT) - 1))) for r, i in zip(rank[removed], ids[removed],
                                                                                              strict=True)]
        + [u[1] for u in unindexed],
        "stage": dec.stage[removed].astype(str).tolist() + ["decode"] * len(unindexed),
        "reason": dec.reason[removed].astype(str).tolist() + [u[2] for u in unindexed],
        "of": np.concatenate([dec.of[removed], np.full(len(unindexed), -1, np.int64)])})
    buf = io.BytesIO()
    import pyarrow.parquet as pq

    pq.write_table(decisions, buf)
    storage.write_bytes(storage.join(dest, DECISIONS), buf.getvalue(), endpoint_url)
    storage.write_bytes(storage.join(dest, REPORT), json.dumps(report, indent=1, sort_keys=True).encode(), endpoint_url)
    return CurateResult(shard_report.manifest, report, decisions=decisions, examples=examples, inputs=inputs)


def build_report(cfg: Any, inputs: list[Input], by_rank: dict[int, Input], dec: Decisions, is_eval: np.ndarray,
                 written: int, digest: str) -> dict[str, Any]:
    """Counts in, removed per stage × reason × source, kept per source; and the thresholds of every stage."""
    rank = dec.ids >> ID_SHIFT
    removed: dict[str, dict[str, dict[str, int]]] = {}
    for row in np.flatnonzero((dec.stage != "") & ~is_eval):
        st, why, src = str(dec.stage[row]), str(dec.reason[row]), by_rank[int(rank[row])].name
        removed.setdefault(st, {}).setdefault(why, {}).setdefault(src, 0)
        removed[st][why][src] += 1
    for inp in inputs:  # images the index pass already rejected (zero bytes, missing from a CSV)
        for f in ([] if inp.eval else inp.index.failures):
            removed.setdefault("decode", {}).setdefault(f["reason"], {}).setdefault(inp.name, 0)
            removed["decode"][f["reason"]][inp.name] += 1
    sources = {}
    for inp in inputs:
        if inp.eval:
            continue
        mine = (rank == inp.rank)
        sources[inp.name] = {"kind": inp.config.kind, "weight": inp.config.weight,
                             "images": int(mine.sum()) + len(inp.index.failures),
                             "kept": int((mine & (dec.stage == "")).sum())}
    stages = {s: getattr(cfg, s).enabled for s in ("quality", "exact", "near", "embedding", "decontaminate")}
    return {"dataset": cfg.dataset, "settings_digest": digest, "stages": stages, "sources": sources,
            "eval_sets": {i.name: len(i.index) for i in inputs if i.eval},
            "removed": removed, "kept": int(sum(s["kept"] for s in sources.values())), "written": written,
            "thresholds": cfg.model_dump(mode="json", include={"quality", "exact", "near", "embedding",
                                                                "decontaminate"})}


def _ray_runner(workers: int) -> Callable[[SourceIndex, Any, list], Iterable[tuple[int, dict]]]:
    """`write_dataset`'s runner: one Ray Data task per planned shard (vfm.data.shard.write_planned_shard)."""

    def run(index: SourceIndex, job: Any, todo: list) -> Iterable[tuple[int, dict]]:
        import ray

        if not todo:
            return
        refs = ray.put((index, job))
        shards = {s.number: s for s in todo}

        def write(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            idx, jb = ray.get(refs)
            recs = [write_planned_shard(idx, jb, shards[int(n)]) for n in batch["number"]]
            return {"number": batch["number"], "record": np.array([json.dumps(r) for r in recs], dtype=object)}

        ds = ray.data.from_items([{"number": s.number} for s in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(write, batch_size=1, batch_format="numpy", num_cpus=1,
                            compute=ray.data.TaskPoolStrategy(size=max(1, min(workers, len(todo)))))
        for row in ds.iter_rows():
            yield int(row["number"]), json.loads(row["record"])

    return run


def already_complete(dest: str, digest: str, endpoint_url: str | None) -> Manifest | None:
    """The manifest at `dest` when a curation with these settings completed there; None when there is none, or
    when other curation settings wrote it (their analysed parts are reused, the decisions and shards redone)."""
    url = storage.join(dest, MANIFEST_NAME)
    if not storage.exists(url, endpoint_url):
        return None
    m = Manifest.load(url, endpoint_url)
    if not m.source.startswith("vfm curate"):
        raise UserError(f"{url} already holds {m.dataset!r} written by {m.source or 'vfm shard'}; curate into "
                        "another --dest")
    return m if m.source == f"vfm curate (settings {digest})" else None
