"""Read a sharded dataset (a Manifest) for training and evaluation, with an exactly restorable position.

The stream is planned, not sampled: exact resumption from a (seed, epoch) plan over global shard indices,
not WebDataset's statistical `resampled=True` restart:

* Data epoch e is one stream of every sample: the shards in an order seeded by (seed, e) (stored order
  without shuffle), back to back. Reader slot s = rank * W + worker of S = R * W slots takes positions
  [s·N/S, (s+1)·N/S) of it: the same number of samples (±1) for every slot, whatever the shard count, so
  every sample is seen once per data epoch. A slot's share is a few runs of consecutive samples ("pieces"),
  each fetched by one ranged read of exactly its bytes through the shard's sample index, so a shard split
  between slots is never read whole by each of them. An optional shuffle buffer runs over each share with
  an RNG keyed by (seed, e, slot).
* Training (`drop_last=True`): each slot streams data epochs back to back and forms full batches; rank r
  yields `epoch_length // (batch_size * world_size)` batches per loader epoch, the same on every rank,
  and batch k of a rank comes from its logical worker k % W (DataLoader's round robin). The workers'
  streams never end, so one DataLoader iterator serves every loader epoch: no worker restart and no
  emptied prefetch queue at an epoch boundary (torch's `persistent_workers` keeps the processes but
  still restarts their iteration, and so refills the pipeline).
* The position is one number, the batches a rank has yielded. From it and the manifest's per-shard
  sample counts every slot's (data epoch, offset) follows without I/O, so `load_state_dict` then
  iteration continues exactly: no repeat, no skip (same world size and worker count). Augmentation is
  seeded per batch from (seed, rank, batch index), so even the random crops reproduce.
* Evaluation (`drop_last=False`): one pass in stored order; each sample goes to exactly one rank, the
  last batch may be short, nothing is padded or duplicated.

Own code rather than the libraries, where they fall short of the above:
* webdataset's `split_by_node` / `split_by_worker` hand out whole shards, so slots get unequal shares
  whenever shards do not divide evenly among slots (the uneven epochs this design removes), and a shard's
  share is found by reading it from the start; here a share is positions of the stream, read by byte range.
* torchdata's `StatefulDataLoader` fast-forwards an iterable dataset by the batches it yielded (reading and
  decoding them again) unless the dataset keeps its own per-worker state, and it aggregates state across
  workers only, not ranks (torchdata `stateful_dataloader/README.md`); with the position computed from one
  number, as here, it would only add a per-worker snapshot. timm's `create_transform` builds the transforms
  (vfm.data.transforms) and webdataset's tar reader parses any sample our splitter does not (`split_sample`).
"""

from __future__ import annotations

import copy
import functools
import io
import itertools
import json
import logging
import math
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vfm import storage
from vfm.data.manifest import Manifest
from vfm.data.transforms import stack_images

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "png", "webp", "jpeg")
DEFAULT_SHUFFLE_BUFFER = 256
# batches each worker has in flight (torch DataLoader prefetch_factor); they sit in /dev/shm until consumed
PREFETCH_FACTOR = 2


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of shard `shard` (positions in the shard as written)."""

    shard: int
    start: int
    stop: int


def span(slot: int, num_slots: int, num_samples: int) -> tuple[int, int]:
    """The positions of a data epoch's stream that reader slot `slot` takes: an equal share, ±1 sample."""
    return slot * num_samples // num_slots, (slot + 1) * num_samples // num_slots


def slot_pieces(manifest: Manifest, seed: int, epoch: int, shuffle: bool, slot: int, num_slots: int) -> list[Piece]:
    """Slot `slot`'s share of data epoch `epoch`: its `span` of the epoch's stream, which is every shard in the
    epoch's order (a permutation seeded by (seed, epoch); stored order without shuffle), back to back."""
    counts = [s.num_samples for s in manifest.shards]
    order = np.random.default_rng([seed, epoch]).permutation(len(counts)) if shuffle else np.arange(len(counts))
    lo, hi = span(slot, num_slots, sum(counts))
    pieces, pos = [], 0
    for i in order:
        a, b = max(lo, pos), min(hi, pos + counts[i])
        if a < b:
            pieces.append(Piece(int(i), a - pos, b - pos))
        pos += counts[i]
        if pos >= hi:
            break
    return pieces


@functools.lru_cache(maxsize=64)  # a slot reads a few shards per epoch; 80 kB per 10k-sample shard
def _sample_offsets(index_url: str) -> np.ndarray:
    return np.asarray(json.loads(storage.read_bytes(index_url)), dtype=np.int64)


_warned_unindexed: set[str] = set()


def _piece_samples(manifest: Manifest, piece: Piece) -> Iterator[dict[str, Any]]:
    """The samples of one piece, from one ranged read of exactly their bytes (the shard's sample index); a
    manifest without indexes streams the shard from its start and skips what comes before the piece."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    info, url = manifest.shards[piece.shard], manifest.shard_url(piece.shard)
    if info.index:
        offsets = _sample_offsets(storage.join(manifest.base_url, info.index))
        with storage.open_read(url, start=int(offsets[piece.start]), stop=int(offsets[piece.stop])) as stream:
            for j in range(piece.start, piece.stop):
                size = int(offsets[j + 1] - offsets[j])
                blob = stream.read(size)
                if len(blob) != size:
                    raise ValueError(f"{url}: sample {j} ends past the end of the shard (its index says bytes "
                                     f"{offsets[j]}-{offsets[j + 1]}); the shard is cut short: shard it again")
                yield split_sample(blob, url, j)
        return
    if piece.start and manifest.location not in _warned_unindexed:
        _warned_unindexed.add(manifest.location)
        log.warning("%s has no sample indexes (written by an older vfm shard): parts of shards are read from "
                    "the shard's start; shard it again to read only what each reader needs", manifest.location)
    with storage.open_read(url) as stream:
        files = tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
        for j, sample in enumerate(group_by_keys(files)):
            if j >= piece.stop:
                return
            if j >= piece.start:
                yield sample


_USTAR_REGULAR = (b"0", b"\0")


def split_sample(blob: bytes, url: str, position: int) -> dict[str, Any]:
    """One sample's members, from its bytes as the shard's sample index delimits them, as webdataset groups them
    ({"__key__", "__url__", "<ext>": bytes}).

    Own code rather than webdataset's `tar_file_expander` + `group_by_keys` for what `vfm shard` writes: those go
    through tarfile's generic header parser, about 40 µs a member and three members a sample, the loader's largest
    cost after decoding. A ustar header of a regular file is read in place here (name, size, checksum checked as
    tarfile checks it); any other member (PAX or GNU long names, links) makes the whole sample go through tarfile."""
    from webdataset.tariterators import base_plus_ext

    sample: dict[str, Any] = {"__url__": url}
    pos, end = 0, len(blob)
    while pos + tarfile.BLOCKSIZE <= end:
        header = blob[pos:pos + tarfile.BLOCKSIZE]
        if not header.strip(b"\0"):
            break  # end-of-archive blocks after the shard's last sample
        if header[156:157] not in _USTAR_REGULAR or header[257:262] != b"ustar":
            return _tarfile_sample(blob, url, position)
        try:
            checksum = int(header[148:156].strip(b"\0 "), 8)
            size = int(header[124:136].strip(b"\0 "), 8)
        except ValueError:
            checksum = size = -1
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counts as 8 spaces
            raise ValueError(f"{url}: sample {position} has a damaged tar header at byte {pos} of the sample; "
                             "the shard is corrupt: shard it again")
        name = header[:100].rstrip(b"\0").decode()
        if header[345:346] != b"\0":
            name = header[345:500].rstrip(b"\0").decode() + "/" + name
        key, ext = base_plus_ext(name)
        data_at = pos + tarfile.BLOCKSIZE
        if key is not None:
            if sample.setdefault("__key__", key) != key:
                raise ValueError(f"{url}: sample {position} holds members of two keys ({sample['__key__']!r}, "
                                 f"{key!r}); its sample index does not match the shard: shard it again")
            sample[ext.lower()] = blob[data_at:data_at + size]
        pos = data_at + size + (-size % tarfile.BLOCKSIZE)
    if "__key__" not in sample:
        raise ValueError(f"{url}: sample {position} has no members; its sample index does not match the shard")
    return sample


def _tarfile_sample(blob: bytes, url: str, position: int) -> dict[str, Any]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    files = tar_file_expander([{"url": url, "stream": io.BytesIO(blob)}], eof_value=None)
    samples = list(group_by_keys(files))
    if len(samples) != 1:
        raise ValueError(f"{url}: sample {position} holds {len(samples)} keys; its sample index does not match "
                         "the shard: shard it again")
    return samples[0]


def _shuffled(samples: Iterator[dict], buffer: int, rng: np.random.Generator) -> Iterator[dict]:
    buf: list[dict] = []
    for s in samples:
        if len(buf) < buffer:
            buf.append(s)
            continue
        j = int(rng.integers(len(buf)))
        out, buf[j] = buf[j], s
        yield out
    for j in rng.permutation(len(buf)):
        yield buf[int(j)]


def slot_stream(manifest: Manifest, *, slot: int, num_slots: int, seed: int, shuffle: bool, shuffle_buffer: int,
                start: int, repeat: bool) -> Iterator[dict[str, Any]]:
    """Raw samples of one reader slot from sample offset `start` of its stream: its `span` of data epoch 0,
    then of epoch 1, ... (with `repeat`). Every span has the same length, so every sample is read once per
    data epoch whatever the ranks, workers and shards. A shuffle buffer, seeded by (seed, epoch, slot), runs
    over each span; resuming mid-span replays it from the span's start."""
    lo, hi = span(slot, num_slots, manifest.num_samples)
    length = hi - lo
    if length == 0:
        if repeat:
            raise ValueError(f"{manifest.dataset}: {num_slots} reader slots (ranks × workers) for "
                             f"{manifest.num_samples} samples leave slot {slot} with none; use fewer ranks or workers")
        return
    epoch = 0
    if repeat:
        epoch, start = divmod(start, length)
    buffered = shuffle and shuffle_buffer > 1
    while True:
        pieces = slot_pieces(manifest, seed, epoch, shuffle, slot, num_slots)
        skip = start if buffered else 0
        if not buffered:  # no buffer to rebuild: start reading at the resume point itself
            pieces = _after(pieces, start)
        samples: Iterator[dict[str, Any]] = itertools.chain.from_iterable(_piece_samples(manifest, p) for p in pieces)
        if buffered:
            samples = _shuffled(samples, shuffle_buffer, np.random.default_rng([seed, epoch, slot]))
        for n, s in enumerate(samples):
            if n >= skip:
                yield s
        start = 0
        if not repeat:
            return
        epoch += 1


def _after(pieces: list[Piece], n: int) -> list[Piece]:
    """`pieces` without their first `n` samples."""
    out = []
    for p in pieces:
        take = min(n, p.stop - p.start)
        n -= take
        if p.start + take < p.stop:
            out.append(Piece(p.shard, p.start + take, p.stop))
    return out


def decode_sample(sample: dict[str, Any], as_tensor: bool = False) -> tuple[Image.Image | torch.Tensor, int,
                                                                           dict[str, Any]]:
    """(image, label, meta) of a raw sample. The image is a PIL image for timm's PIL transforms (training), or with
    `as_tensor` a uint8 RGB CHW tensor from TorchCodec's image decoder (libjpeg-turbo for JPEG: the same pixels as
    PIL's decode, 1.23x its speed on a 500 px JPEG, benchmarks/jpeg_decode.py) for transforms that run on tensors
    (`TensorEvalTransform`, where the larger gain is). TorchCodec rather than `torchvision.io`, whose decoders torchvision 0.29
    deprecates in its favour."""
    key, url = sample.get("__key__"), sample.get("__url__", "?")
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise ValueError(f"sample {key!r} in {url} has no image")
    if as_tensor:
        from torchcodec.decoders import decode_image

        try:
            img = decode_image(data, mode="RGB")
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"sample {key!r} in {url}: its image does not decode ({exc}); the shard holds a "
                             "damaged image: shard the source again (vfm shard checks every image)") from None
        if img.ndim == 4:  # an animated WebP/GIF: its first frame, as PIL opens it
            img = img[0]
    else:
        img = Image.open(io.BytesIO(data))
        if img.mode != "RGB":  # an RGB image is decoded by the transform's first step, with no converted copy
            img = img.convert("RGB")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    meta["key"] = key
    # an unlabelled sample (`vfm curate`'s output, for self-supervised pretraining) has no `.cls`: label -1, which
    # no classification loss accepts, so a labelled task given unlabelled data fails at its first batch
    return img, int(sample["cls"]) if "cls" in sample else -1, meta


def _batch_seed(seed: int, rank: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, rank, k]).generate_state(1)[0])


class _RankStream(IterableDataset):
    """Batches of one rank from its W worker slots, starting at rank batch index `start_batch`."""

    def __init__(self, loader: ShardLoader, start_batch: int):
        self.L, self.start_batch = loader, start_batch

    def __iter__(self):
        L = self.L
        info = get_worker_info()
        W = max(1, L.num_workers)
        physical = info.id if info is not None else 0
        # DataLoader asks workers 0,1,.. in turn from *this* iteration's start: rotate so that rank
        # batch k always comes from logical worker k % W, whatever batch we resume at
        logical = (physical + self.start_batch) % W
        slot = L.rank * W + logical
        k = self.start_batch + (logical - self.start_batch) % W  # this worker's first rank batch index
        done = (k - logical) // W  # batches this logical worker produced before k
        stream = slot_stream(L.manifest, slot=slot, num_slots=L.world_size * W, seed=L.seed,
                             shuffle=L.shuffle, shuffle_buffer=L.shuffle_buffer, start=done * L.batch_size,
                             repeat=L.drop_last)
        while True:
            raw = [s for _, s in zip(range(L.batch_size), stream, strict=False)]
            if not raw or (L.drop_last and len(raw) < L.batch_size):
                return
            yield L.collate(raw, _batch_seed(L.seed, L.rank, k))
            k += W


class ShardLoader:
    """Iterable of (images[B,3,H,W], labels[B]) batches (or dict batches with `with_meta`); see module doc."""

    def __init__(self, manifest: Manifest, *, transform: Callable[[Any], torch.Tensor], batch_size: int,
                 rank: int, world_size: int, seed: int, shuffle: bool, epoch_length: int | None = None,
                 num_workers: int = 0, drop_last: bool = True, with_meta: bool = False,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 sample_fn: Callable[[dict[str, Any]], Any] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.manifest, self.transform, self.batch_size = manifest, transform, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.num_workers, self.drop_last, self.with_meta = num_workers, drop_last, with_meta
        self.shuffle_buffer = shuffle_buffer
        # builds the batch from [(transform(image), label)] instead of stacking (DINOv2 multi-crop + masks);
        # it runs inside the per-batch seeded RNG context, so its randomness reproduces on resume too
        self.collate_fn = collate_fn
        # a raw sample ({"__key__", "jpg", "seg.png", "json", ...}) -> what `collate_fn` takes, in place of
        # decode_sample + transform: dense samples (image + mask / annotations) augment image and target together
        self.sample_fn = sample_fn
        if sample_fn is not None and collate_fn is None:
            raise ValueError("sample_fn needs a collate_fn that batches what it returns")
        self.epoch_length = epoch_length or manifest.num_samples
        self.batches_yielded = 0
        # training's DataLoader iterator, kept across loader epochs; it stands at batches_yielded, since only
        # iterating moves both (load_state_dict, the one other move, drops it)
        self._live: Iterator | None = None
        if drop_last and len(self) == 0:
            raise ValueError(f"{manifest.dataset}: epoch of {self.epoch_length} samples is smaller than one global "
                             f"batch ({batch_size} x {world_size} ranks)")

    def __len__(self) -> int:
        """Batches this rank yields per loader epoch."""
        if self.drop_last:
            return self.epoch_length // (self.batch_size * self.world_size)
        W = max(1, self.num_workers)
        spans = (span(self.rank * W + w, self.world_size * W, self.manifest.num_samples) for w in range(W))
        return sum(math.ceil((hi - lo) / self.batch_size) for lo, hi in spans)

    @property
    def epoch(self) -> int:
        return self.batches_yielded // len(self) if self.drop_last else 0

    def collate(self, raw: list[dict], batch_seed: int):
        # the transform's randomness is a function of the batch position, so a resumed run reproduces it
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed)
            random.seed(batch_seed)
            np.random.seed(batch_seed % 2**32)
            if self.sample_fn is not None:
                custom = self.collate_fn([self.sample_fn(s) for s in raw])
            else:
                decoded = [decode_sample(s, getattr(self.transform, "takes_tensor", False)) for s in raw]
                if self.collate_fn is not None:
                    custom = self.collate_fn([(self.transform(img), label) for img, label, _ in decoded])
                else:
                    images = stack_images([self.transform(img) for img, _, _ in decoded])
        random.setstate(py_state)
        np.random.set_state(np_state)
        if self.collate_fn is not None:
            return custom
        labels = torch.tensor([label for _, label, _ in decoded], dtype=torch.long)
        if self.with_meta:
            return {"image": images, "label": labels, "meta": [m for _, _, m in decoded]}
        return images, labels

    def __iter__(self):
        if self.drop_last:
            n = len(self) - self.batches_yielded % len(self)
        else:
            if self.batches_yielded >= len(self):  # a finished evaluation pass: the next `for` starts over
                self.batches_yielded = 0
            n = len(self) - self.batches_yielded
        if n <= 0:
            return
        it = self._live
        if it is None:
            # a copy without `_live` (__getstate__): loader -> iterator -> dataset -> loader would be a cycle,
            # which keeps the workers up until the cyclic collector happens to run
            ds = _RankStream(copy.copy(self), self.batches_yielded)
            # own generator: creating the iterator draws a base seed, which from the global RNG would shift the
            # trainer's random stream (drop-path) whenever a resumed run opens a new iterator mid-epoch
            # pinned host memory makes the trainer's non_blocking host-to-device copy asynchronous
            dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                            prefetch_factor=PREFETCH_FACTOR if self.num_workers else None,
                            generator=torch.Generator().manual_seed(self.seed))
            it = iter(dl)
            if self.drop_last:  # training streams run on across epochs: the next `for` continues this iterator
                self._live = it
        try:
            for _ in range(n):
                try:
                    batch = next(it)
                except StopIteration:
                    break
                self.batches_yielded += 1
                yield batch
        finally:
            del it

    def close(self) -> None:
        """Let go of training's DataLoader iterator: torch shuts its workers down once nothing holds it (an
        unfinished `for` over this loader still does, until it ends)."""
        self._live = None

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker gets the loader, not the parent's iterator
        return {**self.__dict__, "_live": None}

    def state_dict(self) -> dict[str, Any]:
        return {"batches_yielded": self.batches_yielded, "world_size": self.world_size,
                "num_workers": self.num_workers, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "dataset": self.manifest.dataset, "num_samples": self.manifest.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for k in ("world_size", "num_workers", "batch_size", "seed", "shuffle", "dataset", "num_samples"):
            if state.get(k) != mine[k]:
                raise ValueError(f"loader state was saved with {k}={state.get(k)!r} but this loader has {mine[k]!r}; "
                                 "an exact resume needs the same data, seed, batch size, world size and workers")
        if not self.drop_last and self.num_workers > 1:
            raise ValueError("evaluation loaders (drop_last=False) with several workers restart from the beginning; "
                             "resume positions are kept for training streams")
        self.close()  # the position moves: what the workers prefetched is for elsewhere
        self.batches_yielded = int(state["batches_yielded"])


def build_loader(manifest: Manifest | str, *, transform, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool, epoch_length: int | None = None, num_workers: int = 0, drop_last: bool = True,
                 with_meta: bool = False, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 sample_fn: Callable[[dict[str, Any]], Any] | None = None) -> ShardLoader:
    """A loader over a manifest (object, local path or s3:// URL). `epoch_length` is in samples, global."""
    if isinstance(manifest, str):
        manifest = Manifest.load(manifest)
    return ShardLoader(manifest, transform=transform, batch_size=batch_size, rank=rank, world_size=world_size,
                       seed=seed, shuffle=shuffle, epoch_length=epoch_length, num_workers=num_workers,
                       drop_last=drop_last, with_meta=with_meta, shuffle_buffer=shuffle_buffer,
                       collate_fn=collate_fn, sample_fn=sample_fn)
