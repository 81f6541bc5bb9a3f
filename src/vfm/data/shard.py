"""`vfm shard`: index a source in place, shuffle it globally, write WebDataset shards, commit a manifest.

1. Index (headers only, see sources.py).
2. Plan: per group (ImageNet-C corruption/severity; one group otherwise), a permutation seeded by
   (seed, group) is cut into shards of about `shard_size` bytes. The plan is a pure function of the
   index and the seed, so a rerun plans the very same shards; each has a `plan_hash` of its keys.
3. Write shards in parallel workers: read each shard's samples' original bytes by offset, a window of
   READ_WINDOW_BYTES at a time in archive order (then written in the planned order), check them
   (validate.py), and write `<key>.jpg` (or .png/.webp) + `<key>.cls` + `<key>.json` into a tar with fixed
   metadata (byte-identical on rerun); a dense sample (ADE20K, COCO: vfm.data.dense_sources) writes its image with
   `<key>.seg.png` (the mask) + `<key>.json`, or with `<key>.json` holding its annotations, and no `.cls` -> publish (multipart on S3) -> write `_progress/<shard>.json`
   (the shard's commit: plan_hash, counts, sha256, failures).
4. Resume: a shard whose progress record matches the plan and whose object hashes to the recorded sha256
   is kept; anything else is rewritten. Every input sample is in exactly one planned shard.
5. Last, `_info.json` (timm ReaderWds) and `manifest.json` (the dataset's commit).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import tarfile
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from vfm import storage
from vfm.data.dense_sources import dense_members
from vfm.data.manifest import MANIFEST_NAME, TIMM_INFO_NAME, Manifest, ShardInfo
from vfm.data.sources import DamagedMemberError, SourceIndex
from vfm.data.validate import VERIFY_MODES, check_image

DEFAULT_SHARD_SIZE = 1_000_000_000
UNLABELLED = "unlabelled"  # SourceIndex.task of images without labels (vfm.curate): image + json, no `.cls`
PROGRESS_DIR = "_progress"
# Reliability tests set this to SIGKILL the sharder after publishing the Nth shard's tar and before its
# progress record: the worst moment for a crash (an object exists that nothing vouches for yet).
FAULT_KILL_ENV = "VFM_FAULT_KILL_AFTER_SHARDS"


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("B")
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30}
    for suffix, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


@dataclass(frozen=True)
class PlannedShard:
    number: int
    name: str
    group: str
    entries: np.ndarray
    plan_hash: str


def plan_shards(index: SourceIndex, seed: int, shard_size: int, prefix: str,
                max_samples: int | None = None) -> list[PlannedShard]:
    sizes = np.frombuffer(index.sample_sizes(), dtype=np.int64) if len(index) else np.zeros(0, np.int64)
    groups = np.frombuffer(index.group, dtype=np.int32) if len(index) else np.zeros(0, np.int32)
    shards: list[PlannedShard] = []
    for gid, gname in enumerate(index.groups):
        members = np.flatnonzero(groups == gid)
        if not len(members):
            continue
        order = members[np.random.default_rng([seed, gid]).permutation(len(members))]
        # cut where the running byte count crosses a multiple of shard_size (and at max_samples)
        cum = np.cumsum(sizes[order])
        cut_ids = np.floor_divide(cum - 1, shard_size)
        if max_samples:
            cut_ids = np.maximum(cut_ids, np.arange(len(order)) // max_samples)
        bounds = np.flatnonzero(np.diff(cut_ids)) + 1
        for part in np.split(order, bounds):
            n = len(shards)
            h = hashlib.sha256(f"{seed}:{gname}:".encode())
            for i in part:
                h.update(index.name(int(i)).encode() + b"\0")
            shards.append(PlannedShard(n, f"{prefix}-{n:06d}.tar", gname, part, h.hexdigest()))
    return shards


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)
        return len(b)


@dataclass
class _Job:
    dest: str
    endpoint_url: str | None
    repair: bool
    kill_after: int
    verify: str = "header"


_INDEX: SourceIndex | None = None
_JOB: _Job | None = None
_PUBLISHED = 0


def _init_worker(index: SourceIndex, job: _Job) -> None:
    global _INDEX, _JOB
    _INDEX, _JOB = index, job
    storage.forget_clients()  # a forked worker makes its own connections


# ranged GETs each worker keeps in flight for a source in object storage: one sample's GET is latency-bound
# (~10-30 ms for ~110 kB), so 32 in flight keep a worker near its share of the store's bandwidth
S3_READ_AHEAD = 32


# bytes of a shard a worker reads in archive order before writing them in the planned (shuffled) order: each window's
# reads go forward through the archive (sorted seeks, as `tar` reads, instead of one random seek per sample), and
# a window of a few MB (~40 ImageNet images) stays in the CPU's caches between its read and its write: at 64 MiB
# the same benchmark sharded ~15 % slower (benchmarks/data_shard_throughput.py, page-cache-resident archive)
READ_WINDOW_BYTES = 4 << 20


def _guarded(read: Callable[[int], Any]) -> Callable[[int], Any]:
    """`read`, with a damaged member (a zip CRC mismatch) returned as its error instead of raised: that sample is
    skipped and reported by the writer, the shard goes on."""
    def guarded(i: int) -> Any:
        try:
            return read(i)
        except DamagedMemberError as e:
            return e
    return guarded


def _read_ahead(index: SourceIndex, entries: np.ndarray, window_bytes: int | None = None,
                with_companion: bool = False) -> Iterable[tuple[int, Any]]:
    """(entry, its bytes) in `entries` order; from S3 with S3_READ_AHEAD reads in flight, locally window by window:
    each window of `window_bytes` is read in archive order (file, then offset; each archive opened once) and
    then handed out in the planned order. `with_companion`: the bytes are (sample bytes, companion bytes or
    None), the companion read right after its sample. A DamagedMemberError stands in for a damaged member."""
    window_bytes = window_bytes or READ_WINDOW_BYTES
    if not any(storage.is_s3(f) for f in index.files):
        sizes = np.frombuffer(index.size, dtype=np.int64)
        offsets = np.frombuffer(index.offset, dtype=np.int64)
        file_ids = np.frombuffer(index.file_id, dtype=np.int32)
        window = np.floor_divide(np.cumsum(sizes[entries]) - 1, window_bytes)
        with index.reading(with_companion) as read:
            read = _guarded(read)
            for part in np.split(entries, np.flatnonzero(np.diff(window)) + 1):
                in_archive_order = part[np.lexsort((offsets[part], file_ids[part]))]
                got = {int(i): read(int(i)) for i in in_archive_order}
                for i in part.tolist():
                    yield i, got.pop(i)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    fetch = _guarded((lambda i: (index.read(i), index.read_companion(i))) if with_companion else index.read)
    with ThreadPoolExecutor(S3_READ_AHEAD, thread_name_prefix="sample-get") as pool:
        pending: deque = deque()
        for i in entries.tolist():
            pending.append((i, pool.submit(fetch, i)))
            if len(pending) >= S3_READ_AHEAD:
                j, fut = pending.popleft()
                yield j, fut.result()
        while pending:
            j, fut = pending.popleft()
            yield j, fut.result()


def _progress_url(dest: str, shard_name: str) -> str:
    return storage.join(dest, f"{PROGRESS_DIR}/{shard_name}.json")


def _verified(shard: PlannedShard) -> dict | None:
    """The shard's progress record if the published object matches it, else None (rewrite it)."""
    job = _JOB
    rec_url = _progress_url(job.dest, shard.name)
    if not storage.exists(rec_url, job.endpoint_url):
        return None
    rec = json.loads(storage.read_bytes(rec_url, job.endpoint_url))
    url = storage.join(job.dest, shard.name)
    if rec.get("plan_hash") != shard.plan_hash or not storage.exists(url, job.endpoint_url):
        return None
    if not rec.get("index") or not storage.exists(storage.join(job.dest, rec["index"]), job.endpoint_url):
        return None  # written before sample indexes, or the index was lost: write the shard again
    sha, size = storage.sha256_of(url, job.endpoint_url)
    return rec if (sha, size) == (rec["sha256"], rec["bytes"]) else None


class SampleTar:
    """WebDataset samples as plain ustar members (`<key>.<ext>` for each member, sorted by extension as
    webdataset's TarWriter orders them), with `offset` the bytes written so far: where the next sample starts.

    Own code rather than webdataset's TarWriter: that goes through tarfile, whose generic header path costs
    ~45 µs a member (three per sample), the largest part of sharding. These members are regular files with
    short names, so each header is one template with name, size and checksum filled in; the bytes are those
    tarfile writes (tests/data/test_shard_tar.py), end blocks and record padding included. A name that does
    not fit ustar takes tarfile's own header (PAX)."""

    def __init__(self, f: Any, *, mode: int = 0o444, user: str = "vfm", group: str = "vfm"):
        self.f, self.offset = f, 0
        self._info = {"mode": mode, "uname": user, "gname": group, "mtime": 0}
        t = self._tarinfo("", 0).tobuf(tarfile.USTAR_FORMAT)
        self._template = bytearray(t[:148] + b" " * 8 + t[156:])  # checksum as spaces while it is summed
        self._template_sum = sum(self._template) - sum(self._template[124:136])  # all but name and size

    def _tarinfo(self, name: str, size: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size = size
        for k, v in self._info.items():
            setattr(ti, k, v)
        return ti

    def header(self, name: str, size: int) -> bytes:
        raw = name.encode()
        if len(raw) > 100 or size >= 8 ** 11:
            return self._tarinfo(name, size).tobuf(tarfile.PAX_FORMAT)
        h = self._template.copy()
        size_field = b"%011o\0" % size
        h[0:len(raw)] = raw
        h[124:136] = size_field
        h[148:155] = b"%06o\0" % (self._template_sum + sum(raw) + sum(size_field))
        return bytes(h)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        parts = []
        for ext in sorted(members):
            data = members[ext]
            parts += [self.header(f"{key}.{ext}", len(data)), data, b"\0" * (-len(data) % tarfile.BLOCKSIZE)]
        sample = b"".join(parts)  # one write (and one hash update) per sample
        self.f.write(sample)
        self.offset += len(sample)

    def close(self) -> None:
        """The end-of-archive blocks, then zeros up to a whole record, as tarfile ends a stream."""
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self.f.write(b"\0" * (2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a pod's CPU limit), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):  # no cgroup v2 CPU controller here: the affinity is the limit
        return max(1, cpus)
    return max(1, cpus if quota == "max" else min(cpus, int(quota) // int(period)))


def index_name(shard_name: str) -> str:
    return shard_name + ".idx"


def _write_shard(shard: PlannedShard) -> dict:
    global _PUBLISHED
    index, job = _INDEX, _JOB
    rec = _verified(shard)
    if rec is not None:
        return {**rec, "resumed": True}
    failures: list[dict[str, str]] = []
    count = 0
    meta = index.group_meta.get(shard.group, {})
    offsets: list[int] = []  # the sample index: where each sample's members start, then where the last ends
    url = storage.join(job.dest, shard.name)
    with storage.open_write(url, job.endpoint_url) as out:  # no staging copy: the tar streams to its place
        hw = _HashingWriter(out)
        writer = SampleTar(hw)
        dense = index.task != "classification"
        for i, data in _read_ahead(index, shard.entries, with_companion=index.companions is not None):
            name, label = index.name(i), index.label[i]
            key = index.key(i)
            if isinstance(data, DamagedMemberError):
                failures.append({"key": key, "name": name, "source": index.source_of(i), "reason": str(data),
                                 "action": "skipped"})
                continue
            data, companion = data if isinstance(data, tuple) else (data, None)
            checked = check_image(data, name, repair=job.repair, verify=job.verify)
            if checked.problem:
                failures.append({"key": key, "name": name, "source": index.source_of(i),
                                 "reason": checked.problem,
                                 "action": "skipped" if checked.data is None else "repaired"})
            if checked.data is None:
                continue
            if index.task == UNLABELLED:  # `vfm curate`'s output: the image and its curation json (source, name)
                members = {checked.ext: checked.data, "json": index.payload(i) or b"{}"}
            elif dense:
                members = dense_members(index, i, checked.data, checked.ext, companion, job.verify)
                if isinstance(members, str):
                    failures.append({"key": key, "name": name, "source": index.source_of(i), "reason": members,
                                     "action": "skipped"})
                    continue
            else:
                info = {"wnid": index.classes[label], "name": name, **meta}
                # three members, not image + json: timm's `wds/` reader takes the label from `.cls` unless told a
                # json field (timm/data/readers/reader_wds.py `_decode`), so plain `train.py --dataset wds/...` works
                members = {checked.ext: checked.data, "cls": str(label).encode(),
                           "json": json.dumps(info, sort_keys=True).encode()}
            offsets.append(writer.offset)
            writer.write(key, members)
            count += 1
        offsets.append(writer.offset)
        writer.close()
    storage.write_bytes(storage.join(job.dest, index_name(shard.name)), json.dumps(offsets).encode(), job.endpoint_url)
    _PUBLISHED += 1
    if job.kill_after and _PUBLISHED >= job.kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    rec = {"name": shard.name, "group": shard.group, "plan_hash": shard.plan_hash, "num_samples": count,
           "bytes": hw.n, "sha256": hw.h.hexdigest(), "index": index_name(shard.name), "failures": failures}
    storage.write_bytes(_progress_url(job.dest, shard.name), json.dumps(rec, sort_keys=True).encode(),
                        job.endpoint_url)
    return {**rec, "resumed": False}


@dataclass
class ShardReport:
    manifest: Manifest | None
    written: int
    resumed: int
    remaining: int


def write_dataset(
    index: SourceIndex,
    dest: str,
    *,
    split: str = "train",
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_samples_per_shard: int | None = None,
    workers: int = 1,
    repair: bool = False,
    endpoint_url: str | None = None,
    source: str = "",
    max_new_shards: int | None = None,
    on_shard: Callable[[dict], None] = lambda _rec: None,
    on_plan: Callable[[int, int], None] = lambda _shards, _samples: None,
    verify: str = "header",
    runner: Callable[[SourceIndex, Any, list[PlannedShard]], Iterable[tuple[int, dict]]] | None = None,
) -> ShardReport:
    """Shard `index` to `dest` (a directory or s3:// prefix); resumable; the manifest is written last.
    `verify`: "header" checks each image's bytes and header (vfm.data.validate), "decode" decodes it too.
    `runner(index, job, shards)` writes the planned shards elsewhere than this machine's process pool (vfm.curate
    writes them as Ray tasks, each calling `write_planned_shard`) and yields (shard number, its record)."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}: use one of {', '.join(VERIFY_MODES)}")
    plan = plan_shards(index, seed, shard_size, index.dataset, max_samples_per_shard)
    on_plan(len(plan), len(index))
    job = _Job(dest, endpoint_url, repair, int(os.environ.get(FAULT_KILL_ENV, "0") or 0), verify)
    todo = plan
    results: dict[int, dict] = {}
    if max_new_shards is not None:
        # a bounded run (time-limited jobs): verify everything, write at most N missing shards
        _init_worker(index, job)
        todo = []
        for s in plan:
            rec = _verified(s)
            if rec is not None:
                results[s.number] = {**rec, "resumed": True}
                on_shard(results[s.number])
            else:
                todo.append(s)
        todo = todo[:max_new_shards]
    for number, rec in (runner or partial(_run, workers=workers))(index, job, todo):
        results[number] = rec
        on_shard(rec)
    written = sum(1 for r in results.values() if not r["resumed"])
    resumed = len(results) - written
    if len(results) < len(plan):
        return ShardReport(None, written, resumed, len(plan) - len(results))
    shards = [ShardInfo(name=r["name"], num_samples=r["num_samples"], bytes=r["bytes"], sha256=r["sha256"],
                        url=storage.join(dest, r["name"]), group=r["group"], index=r["index"])
              for r in (results[s.number] for s in plan) if r["num_samples"] > 0]
    failures = list(index.failures) + [f for n in sorted(results) for f in results[n]["failures"]]
    failures.sort(key=lambda f: (f["key"], f["reason"]))
    manifest = Manifest(
        dataset=index.dataset, split=split, classes=list(index.classes), shards=shards, seed=seed,
        shard_size=shard_size, source=source,
        groups={g: index.group_meta.get(g, {}) for g in index.groups if any(s.group == g for s in shards)},
        failures=failures, class_subset=dict(index.class_subset), task=index.task,
        categories=list(index.categories),
    )
    storage.write_bytes(storage.join(dest, TIMM_INFO_NAME), json.dumps(manifest.timm_info(), indent=1).encode(),
                        endpoint_url)
    storage.write_bytes(storage.join(dest, "classes.txt"), ("\n".join(index.classes) + "\n").encode(), endpoint_url)
    manifest_url = storage.join(dest, MANIFEST_NAME)
    storage.write_bytes(manifest_url, manifest.to_json().encode(), endpoint_url)
    manifest.location = manifest_url
    return ShardReport(manifest, written, resumed, 0)


def write_planned_shard(index: SourceIndex, job: _Job, shard: PlannedShard) -> dict:
    """Write (or verify and keep) one planned shard in this process: what a `write_dataset` runner's task calls."""
    if _INDEX is not index or _JOB is not job:
        _init_worker(index, job)
    return _write_shard(shard)


def _run(index: SourceIndex, job: _Job, todo: list[PlannedShard], workers: int) -> Iterable[tuple[int, dict]]:
    if workers <= 1 or len(todo) <= 1:
        _init_worker(index, job)
        for s in todo:
            yield s.number, _write_shard(s)
        return
    # fork where there is one: a spawned worker re-imports the parent's main module (a CLI or a benchmark that
    # imports torch costs seconds per worker); the fork drops the parent's S3 clients (`_init_worker`), which
    # must not be shared, and opens its own archive descriptors (SourceIndex.reading)
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(index, job)) as pool:
        futures = {pool.submit(_write_shard, s): s.number for s in todo}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()
