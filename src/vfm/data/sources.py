"""Read the official dataset layouts in place and index their samples without extracting anything.

An index pass walks tar headers only (seeking over the image data) and records, per sample, where its
bytes are: (source file, byte offset, size), its label, its group (ImageNet-C corruption/severity) and
its original name. The index is a few compact arrays (~40 bytes + the name per sample, so ~0.8 GB for
the 14 M images of fall11), which is what lets `vfm shard` shuffle the *whole* dataset with bounded
memory and then read each shard's samples by offset (`os.pread`) in parallel workers.

Layouts (as published: pytorch/vision torchvision/datasets/imagenet.py, hendrycks/imagenet-r eval.py,
google-research/augmix imagenet.py `test_c` for ImageNet-C):
  in22k-fall11 / in21k-winter21 / in1k   tar of per-wnid tars (`n01440764.tar` ...); `.tar.gz` outer
                                         archives are decompressed once into a spool file (gzip is
                                         not seekable)
  in1k-val                               flat tar of ILSVRC2012_val_*.JPEG + LOC_val_solution.csv or
                                         the devkit's ground truth
  imagenet-r                             imagenet-r.tar: imagenet-r/<wnid>/*.jpg (labels = IN-1K index)
  imagenet-c                             the Zenodo tarballs: <corruption>/<severity>/<wnid>/*.JPEG
  folder                                 <root>/<class>/<image> (a user's own data)
  ade20k / coco2017                      the dense-transfer zips (vfm.data.dense_sources): each sample is an
                                         image plus a companion, a mask member or inline annotations
Each of these also accepts the same tree already extracted to a directory.

A source may also be an archive in object storage (`s3://bucket/fall11_whole.tar`, or an `s3://` prefix
holding ImageNet-C's tarballs): the index pass reads it forward in ranged GETs with read-ahead
(`storage.RangedFile`), and each sample is then one ranged GET of its bytes (`storage.read_range`), so
nothing is downloaded whole. A `.tar.gz` is streamed once into the spool file, as a local one is.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import tarfile
import tempfile
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfm import storage
from vfm.data import classes as class_lists
from vfm.errors import UserError

CLASSIFICATION_DATASETS = ("in22k-fall11", "in21k-winter21", "in1k", "in1k-val", "imagenet-r", "imagenet-c", "folder")
DENSE_DATASETS = ("ade20k", "coco2017")
DATASETS = CLASSIFICATION_DATASETS + DENSE_DATASETS


class SourceError(UserError):
    """The source data cannot be read as the requested layout; the message says what to do."""


class TruncatedArchiveError(SourceError):
    def __init__(self, path: str, offset: int, size: int, detail: str):
        self.path, self.offset = path, offset
        super().__init__(
            f"{path}: archive is truncated or damaged at byte offset {offset:,} (file size {size:,}): {detail}. "
            "Nothing was written for it. Complete or re-download the file (e.g. `curl -C - -O ...` or "
            "`aws s3 cp` again, then compare its md5/size with the official one) and rerun the same "
            "`vfm shard` command: shards already finished at the destination are verified and kept."
        )


class DamagedMemberError(SourceError):
    """One member's stored bytes do not decompress to what its archive's directory promises (zip CRC-32);
    the shard writer skips and reports that sample, the run goes on."""


# `codec` of a member (SourceIndex.codec, Members.codec): 0, the bytes at (offset, size) are the member (tar,
# folder, a zip member stored); DEFLATED | crc, they are a zip member's raw deflate stream (method 8, the
# zipfile default), inflated on read and checked against the CRC-32 of the zip's central directory
DEFLATED = 1 << 32


def decode_member(data: bytes, codec: int, where: str) -> bytes:
    """The member's bytes from its stored bytes (see DEFLATED)."""
    if not codec:
        return data
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, no zlib header: zip's method 8
    try:
        out = inflater.decompress(data) + inflater.flush()
    except zlib.error as e:
        raise DamagedMemberError(f"{where}: deflate stream is damaged ({e})") from None
    if not inflater.eof or zlib.crc32(out) != codec & 0xFFFFFFFF:
        raise DamagedMemberError(f"{where}: inflated bytes do not match the zip's CRC-32 (damaged member); "
                                 "re-download the archive")
    return out


@dataclass
class Packed:
    """Variable-length byte strings in one buffer with their end offsets: 8 bytes of overhead an entry instead of a
    Python object each (an IN-22K index holds 14 M names)."""

    data: bytearray = field(default_factory=bytearray)
    end: array = field(default_factory=lambda: array("q"))

    def append(self, item: bytes) -> None:
        self.data += item
        self.end.append(len(self.data))

    def __getitem__(self, i: int) -> bytes:
        return bytes(self.data[self.end[i - 1] if i else 0 : self.end[i]])

    def __len__(self) -> int:
        return len(self.end)


@dataclass
class Members:
    """A second member of every sample (a segmentation mask), parallel to a SourceIndex's entries and located the
    same way: files[file_id[i]] + (offset[i], size[i]), decoded by codec[i]; file_id -1 when sample i has none."""

    file_id: array = field(default_factory=lambda: array("i"))
    offset: array = field(default_factory=lambda: array("q"))
    size: array = field(default_factory=lambda: array("q"))
    codec: array = field(default_factory=lambda: array("q"))
    _names: Packed = field(default_factory=Packed)

    def add(self, file_id: int, offset: int, size: int, name: str, codec: int = 0) -> None:
        self.file_id.append(file_id)
        self.offset.append(offset)
        self.size.append(size)
        self.codec.append(codec)
        self._names.append(name.encode())

    def name(self, i: int) -> str:
        return self._names[i].decode()


@dataclass
class SourceIndex:
    """Where every sample of a dataset is. Entry i: files[file_id[i]] + (offset[i], size[i]).

    Dense layouts (vfm.data.dense_sources) add, per entry, a `codec` (zip members; see DEFLATED), a companion
    member (`companions`: the ADE20K mask) and/or an inline `payload` (COCO's annotations of the image, compact
    JSON); classification layouts leave all three empty, so their shards are what they always were."""

    dataset: str
    classes: list[str]
    files: list[str] = field(default_factory=list)
    file_id: array = field(default_factory=lambda: array("i"))
    offset: array = field(default_factory=lambda: array("q"))
    size: array = field(default_factory=lambda: array("q"))
    label: array = field(default_factory=lambda: array("i"))
    group: array = field(default_factory=lambda: array("i"))
    _names: Packed = field(default_factory=Packed)
    groups: list[str] = field(default_factory=lambda: [""])
    group_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    """Samples rejected while indexing (unknown wnid, zero bytes, unreadable inner archive, no label)."""
    class_subset: dict[str, Any] = field(default_factory=dict)
    """How `subset_index` drew this index from a larger one ({} for the whole source)."""
    task: str = "classification"
    """What a sample holds: classification (image + label), semantic_segmentation (image + mask), object_detection
    (image + annotations); the shard writer writes each task's members (vfm.data.shard)."""
    categories: list[dict[str, Any]] = field(default_factory=list)
    """Dense tasks: the dataset's classes with the ids its masks / annotations use ([{"id", "name", ...}])."""
    codec: array = field(default_factory=lambda: array("q"))
    """Per entry when any entry is a compressed zip member (see DEFLATED); empty: every entry is its bytes."""
    companions: Members | None = None
    _payload: Packed = field(default_factory=Packed)
    _keys: Packed | None = None
    """Per entry when its sample key is not its name's (`add_dense(key=...)`: vfm.curate names each image by source,
    and writes a repeated image under a key of its own); None: `sample_key(name)`."""

    def __len__(self) -> int:
        return len(self.offset)

    def add_file(self, path: str) -> int:
        self.files.append(path)
        return len(self.files) - 1

    def group_id(self, name: str, meta: dict[str, Any] | None = None) -> int:
        if name not in self.groups:
            self.groups.append(name)
        self.group_meta.setdefault(name, meta or {})
        return self.groups.index(name)

    def add(self, file_id: int, offset: int, size: int, label: int, name: str, group: int = 0) -> None:
        self.file_id.append(file_id)
        self.offset.append(offset)
        self.size.append(size)
        self.label.append(label)
        self.group.append(group)
        self._names.append(name.encode())

    def add_dense(self, file_id: int, offset: int, size: int, name: str, *, codec: int = 0,
                  companion: tuple[int, int, int, str, int] | None = None, payload: bytes = b"",
                  key: str | None = None) -> None:
        """An entry of a dense layout (or an unlabelled one): its image, then the companion member (file_id, offset,
        size, name, codec) or inline `payload` bytes. Label 0 and group 0: such a sample has no class label of its
        own. `key`: its sample key, when not `sample_key(name)` (give it for every entry or for none)."""
        if key is not None:
            if self._keys is None:
                if len(self):
                    raise ValueError("add_dense(key=...): give every entry its key, from the first one")
                self._keys = Packed()
            self._keys.append(key.encode())
        self.add(file_id, offset, size, 0, name)
        self.codec.append(codec)
        if companion is not None or self.companions is not None:
            if self.companions is None:
                raise ValueError("add_dense with a companion: set `index.companions = Members()` before the first entry")
            if companion is None:
                self.companions.add(-1, 0, 0, "")
            else:
                self.companions.add(*companion)
        self._payload.append(payload)

    def payload(self, i: int) -> bytes:
        """Entry i's inline bytes (b"" when the layout has none)."""
        return self._payload[i] if len(self._payload) else b""

    def sample_sizes(self) -> array:
        """Bytes each sample puts into a shard as far as the index knows them (image, companion, payload): what
        plan_shards cuts shards by. For classification layouts, `size` itself."""
        if self.companions is None and not len(self._payload):
            return self.size
        out = array("q", self.size)
        for i in range(len(out)):
            out[i] += (self.companions.size[i] if self.companions is not None else 0) + len(self.payload(i))
        return out

    def fail(self, name: str, source: str, reason: str, key: str | None = None, action: str = "skipped") -> None:
        self.failures.append({"key": key or sample_key(name), "name": name, "source": source, "reason": reason,
                              "action": action})

    def name(self, i: int) -> str:
        return self._names[i].decode()

    def key(self, i: int) -> str:
        """Entry i's WebDataset sample key."""
        return self._keys[i].decode() if self._keys is not None else sample_key(self.name(i))

    def source_of(self, i: int) -> str:
        return self.files[self.file_id[i]]

    @contextlib.contextmanager
    def reading(self, with_companion: bool = False) -> Iterator[Callable[[int], Any]]:
        """`read` with each local archive opened once for the block: one descriptor per archive and worker,
        then a `pread` per sample, instead of an open, a read and a close for each. `with_companion`: the
        callable returns (sample bytes, companion bytes or None), read through the same descriptors."""
        with _open_archives() as fds:
            if with_companion:
                yield lambda i: (self.read(i, fds), self.read_companion(i, fds))
            else:
                yield lambda i: self.read(i, fds)

    def read(self, i: int, fds: dict[str, int | None] | None = None) -> bytes:
        """Sample i's bytes; `fds` keeps local archives open across calls (`reading`), else this call opens
        and closes its own."""
        if fds is None:
            with self.reading() as read:
                return read(i)
        path = self.files[self.file_id[i]]
        data = _read_range(path, self.offset[i], self.size[i], self.name(i), fds)
        return decode_member(data, self.codec[i], f"{path}: {self.name(i)}") if self.codec else data

    def read_companion(self, i: int, fds: dict[str, int | None] | None = None) -> bytes | None:
        """Sample i's companion member (its mask), or None when it has none."""
        c = self.companions
        if c is None or c.file_id[i] < 0:
            return None
        if fds is None:
            with _open_archives() as own:
                return self.read_companion(i, own)
        path = self.files[c.file_id[i]]
        data = _read_range(path, c.offset[i], c.size[i], c.name(i), fds)
        return decode_member(data, c.codec[i], f"{path}: {c.name(i)}")


@contextlib.contextmanager
def _open_archives() -> Iterator[dict[str, int | None]]:
    """Descriptors of the local archives read in the block (path -> fd; None for a folder), closed at its end."""
    fds: dict[str, int | None] = {}
    try:
        yield fds
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)


def _read_range(path: str, offset: int, size: int, name: str, fds: dict[str, int | None]) -> bytes:
    """`size` bytes at `offset` of an archive (one ranged GET on S3, a `pread` locally through `fds`, which keeps
    each local archive open), or the file `name` of a folder source."""
    if storage.is_s3(path):
        data = storage.read_range(path, offset, size)  # one ranged GET
    else:
        if path not in fds:
            fds[path] = None if os.path.isdir(path) else os.open(path, os.O_RDONLY)
        fd = fds[path]
        if fd is None:  # a folder of images
            return Path(path, name).read_bytes()
        data = os.pread(fd, size, offset)
    if len(data) != size:
        raise TruncatedArchiveError(path, offset + len(data), storage.object_size(path),
                                    f"member {name!r} ends past the end of the file")
    return data


def subset_index(index: SourceIndex, *, num_classes: int = 0, fraction: float = 1.0, seed: int = 0,
                 classes: list[str] | None = None) -> SourceIndex:
    """`num_classes` classes drawn with `seed` from the sorted names of the classes that have samples (or the
    `classes` given), relabelled 0.. in sorted order, and `fraction` of each class's samples (the lowest
    hashes of seed + name, at least one per class).

    Only the set of classes decides the draw, so IN-1K train and val (the same 1,000 wnids) give the same
    classes with the same seed, and a sample's membership depends on nothing but its name: a rerun, or
    another worker count, shards the same subset. Samples left out are not failures."""
    import hashlib
    import random

    if index.task != "classification":
        raise SourceError(f"--subset-classes / --subset-class-file draw classes of a classification dataset; "
                          f"{index.dataset} is {index.task} (its samples have no single class): shard it whole")
    present = sorted({index.classes[label] for label in set(index.label)})
    if not 0 < fraction <= 1:
        raise SourceError(f"--subset-fraction {fraction}: choose a fraction in (0, 1]")
    if classes:
        have = set(present)
        missing = [c for c in classes if c not in have]
        if missing:
            raise SourceError(f"--subset-class-file: {len(missing)} of its {len(classes)} classes have no samples in "
                              f"the source (e.g. {missing[:5]}); fix the list or the archive")
        chosen = sorted(set(classes))
        num_classes = len(chosen)
    else:
        if not 1 <= num_classes <= len(present):
            raise SourceError(f"--subset-classes {num_classes}: the source has samples of {len(present)} classes; "
                              f"choose 1..{len(present)}")
        chosen = sorted(random.Random(seed).sample(present, num_classes))
    position = {c: i for i, c in enumerate(index.classes)}
    old_to_new = {position[c]: i for i, c in enumerate(chosen)}
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(index.label):
        if label in old_to_new:
            by_class.setdefault(label, []).append(i)
    keep: list[int] = []
    for members in by_class.values():
        n = max(1, round(fraction * len(members)))
        if n < len(members):
            members = sorted(members, key=lambda i: hashlib.sha256(f"{seed}:{index.name(i)}".encode()).digest())[:n]
        keep.extend(members)
    keep.sort()  # archive order: the shard writer reads each shard's samples by offset
    out = SourceIndex(dataset=index.dataset, classes=chosen, files=index.files, groups=index.groups,
                      group_meta=index.group_meta, failures=index.failures,
                      class_subset={"num_classes": num_classes, "fraction": fraction, "seed": seed,
                                    **({"classes": chosen} if classes else {}),
                                    "of_classes": len(index.classes), "of_samples": len(index)})
    for i in keep:
        out.add(index.file_id[i], index.offset[i], index.size[i], old_to_new[index.label[i]], index.name(i),
                index.group[i])
    return out


def sample_key(name: str) -> str:
    """WebDataset key from an original path: extension dropped; dots would split the key, so they go."""
    stem, _, ext = name.rpartition(".")
    base = stem if stem and "/" not in ext else name
    return base.replace(".", "_")


# ---------------------------------------------------------------------------------------------------
# Walkers: yield (path inside the source, byte offset in the file, size) for every regular file.


class _Window:
    """A read-only, seekable view of [start, start+size) of an open file: an inner tar inside an outer one."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.size + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data


def _tar_members(path: str, fileobj=None, base: int = 0, outer: bool = True) -> Iterator[tarfile.TarInfo]:
    """Headers of a tar; a read error or missing end-of-archive marker on the *outer* file is truncation."""
    own = fileobj is None
    f = open_archive(path) if own else fileobj
    size = storage.object_size(path) if own else f.size
    try:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            raise TruncatedArchiveError(path, base, size, f"not a readable tar ({e})") from e
        while True:
            try:
                m = tf.next()
            except tarfile.ReadError as e:
                raise TruncatedArchiveError(path, base + tf.offset, size, str(e)) from e
            if m is None:
                break
            if m.offset_data + m.size > size:
                raise TruncatedArchiveError(path, base + m.offset, size, f"member {m.name!r} is cut short")
            tf.members.clear()  # bounded memory: tarfile would otherwise keep every header
            yield m
        end = tf.offset
        if outer and own:
            # tarfile treats a file cut exactly at a member boundary as complete; a real tar ends with
            # zero blocks, so their absence means the download stopped early
            f.seek(end)
            if f.read(1024) != b"\0" * 1024 and end < size:
                raise TruncatedArchiveError(path, end, size, "garbage after the last member")
            if end + 1024 > size:
                raise TruncatedArchiveError(path, end, size, "no end-of-archive marker after the last member")
    finally:
        if own:
            f.close()


def open_archive(path: str):
    """A seekable binary file of a local archive or of one in object storage (ranged GETs)."""
    return storage.RangedFile(path) if storage.is_s3(path) else open(path, "rb")


def walk_tar(path: str) -> Iterator[tuple[str, int, int]]:
    for m in _tar_members(path):
        if m.isfile():
            yield m.name.removeprefix("./"), m.offset_data, m.size


def walk_dir(root: str) -> Iterator[tuple[str, int, int]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            yield os.path.relpath(full, root).replace(os.sep, "/"), 0, os.path.getsize(full)


def walk_tar_of_tars(path: str, index: SourceIndex, progress: Callable[[str], None]) -> Iterator[tuple[str, int, int]]:
    """Members of every inner `<wnid>.tar` as `<wnid>/<member>`; an unreadable inner tar is reported, the rest go on."""
    with open_archive(path) as f:
        for outer in _tar_members(path):
            if not outer.isfile():
                continue
            wnid = Path(outer.name).name.split(".")[0]
            progress(wnid)
            if not outer.name.endswith(".tar"):
                index.fail(outer.name, path, "outer member is not a per-class .tar")
                continue
            members = plain_tar_files(f, outer.offset_data, outer.size)
            if members is None:  # not plain ustar files only (or damaged): tarfile parses it, and reports damage
                window = _Window(f, outer.offset_data, outer.size)
                try:
                    tf = tarfile.open(fileobj=window, mode="r:")
                    members = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
                except (tarfile.TarError, OSError) as e:
                    index.fail(f"{wnid}/", path,
                               f"inner archive {outer.name} unreadable at outer offset {outer.offset_data}: {e}")
                    continue
            for name, offset, size in members:
                if offset + size > outer.size:
                    index.fail(f"{wnid}/{name}", path, "member cut short inside its class tar")
                    continue
                yield f"{wnid}/{name.rsplit('/', 1)[-1]}", outer.offset_data + offset, size


_REGULAR_TYPES = (b"0", b"\0")
_SKIPPED_TYPES = (b"5",)  # directories: no data, nothing to index


def plain_tar_files(f, start: int, size: int) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of the regular files in the tar at [start, start + size) of `f`, as tarfile reads
    them, when every header is a plain ustar/GNU one (regular files and directories, short names, valid
    checksums); None otherwise, and tarfile then parses that tar.

    Own code rather than tarfile for the common case: listing a member costs tarfile ~19 µs and this ~6 µs
    (a 5,000-member tar here), over ImageNet's per-class tars 1.28 M members for IN-1K and 14 M for IN-22K;
    this reads each 512-byte header and takes four fields, the same ones tarfile.TarInfo.frombuf takes."""
    out: list[tuple[str, int, int]] = []
    pos = 0
    while pos + tarfile.BLOCKSIZE <= size:
        f.seek(start + pos)
        header = f.read(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:
            return None
        if header.count(0) == tarfile.BLOCKSIZE:
            return out  # the end-of-archive blocks
        kind = header[156:157]
        if header[257:262] != b"ustar" or (kind not in _REGULAR_TYPES and kind not in _SKIPPED_TYPES) \
                or header[124] & 0x80:  # PAX/GNU extensions, links, base-256 sizes: tarfile's cases
            return None
        try:
            checksum, length = int(header[148:156].strip(b"\0 "), 8), int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            return None
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if kind in _REGULAR_TYPES and not name.endswith("/"):  # V7 tar: a "regular" name ending in / is a folder
            out.append((name, pos + tarfile.BLOCKSIZE, length))
        pos += tarfile.BLOCKSIZE + length + (-length % tarfile.BLOCKSIZE)
    return out


class _Counting:
    """A read-only stream that counts the compressed bytes consumed (for progress and error offsets)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.n += len(data)
        return data


def gunzip_to_spool(path: str, spool_dir: str | None, progress: Callable[[int], None]) -> str:
    """Decompress a `.tar.gz` once into a seekable spool tar (kept and reused across reruns)."""
    spool = Path(spool_dir or tempfile.gettempdir()) / (path.rsplit("/", 1)[-1][: -len(".gz")])
    done = spool.with_name(spool.name + ".complete")
    size = storage.object_size(path)
    stamp = f"{size}:{int(os.stat(path).st_mtime)}" if not storage.is_s3(path) else f"{size}:{path}"
    if spool.exists() and done.exists() and done.read_text() == stamp:
        return str(spool)
    spool.parent.mkdir(parents=True, exist_ok=True)
    with storage.open_read(path) as body:  # S3: one streamed GET; gzip is read front to back either way
        raw = _Counting(body)
        with gzip.GzipFile(fileobj=raw) as gz, open(spool, "wb") as out:
            try:
                while chunk := gz.read(16 * 1024 * 1024):
                    out.write(chunk)
                    progress(raw.n)
            except (EOFError, OSError, gzip.BadGzipFile) as e:
                raise TruncatedArchiveError(path, raw.n, size, f"gzip stream broken: {e}") from e
    done.write_text(stamp)
    return str(spool)


# ---------------------------------------------------------------------------------------------------
# Labels


def val_labels_from_loc_csv(path: str) -> dict[str, str]:
    """Kaggle LOC_val_solution.csv: ImageId -> first token of PredictionString (the wnid)."""
    out: dict[str, str] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or {"ImageId", "PredictionString"} - set(reader.fieldnames):
            raise SourceError(f"{path}: expected columns ImageId,PredictionString (Kaggle LOC_val_solution.csv)")
        for row in reader:
            tokens = row["PredictionString"].split()
            if not tokens:
                raise SourceError(f"{path}: empty PredictionString for {row['ImageId']}")
            out[row["ImageId"]] = tokens[0]
    return out


def val_labels_from_devkit(path: str) -> dict[str, str]:
    """ILSVRC2012_devkit_t12.tar.gz: the ground truth holds ILSVRC2012_IDs in meta.mat order, which are
    mapped to wnids through meta.mat's leaf synsets (the procedure of torchvision's parse_devkit_archive);
    they are never sorted-wnid indices."""
    import scipy.io

    with tarfile.open(path) as tf:
        by_name = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
        try:
            meta_bytes = tf.extractfile(by_name["meta.mat"]).read()
            gt_text = tf.extractfile(by_name["ILSVRC2012_validation_ground_truth.txt"]).read().decode()
        except KeyError as e:
            raise SourceError(f"{path}: devkit lacks data/{e.args[0]}") from e
    synsets = scipy.io.loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
    synsets = [synsets] if synsets.ndim == 0 else synsets
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    ids = [int(line) for line in gt_text.split()]
    try:
        return {f"ILSVRC2012_val_{i + 1:08d}": id_to_wnid[cid] for i, cid in enumerate(ids)}
    except KeyError as e:
        raise SourceError(f"{path}: ground truth names ILSVRC2012_ID {e.args[0]} which meta.mat lacks") from e


def load_val_labels(path: str) -> dict[str, str]:
    if storage.is_s3(path):  # a few MB: fetch it once
        if not storage.exists(path):
            raise SourceError(f"--labels {path} does not exist")
        local = Path(tempfile.mkdtemp(prefix="vfm-labels-")) / path.rsplit("/", 1)[-1]
        local.write_bytes(storage.read_bytes(path))
        return load_val_labels(str(local))
    if path.endswith(".csv"):
        return val_labels_from_loc_csv(path)
    if path.endswith((".tar.gz", ".tgz", ".tar")):
        return val_labels_from_devkit(path)
    raise SourceError(f"{path}: --labels must be LOC_val_solution.csv or ILSVRC2012_devkit_t12.tar.gz")


# ---------------------------------------------------------------------------------------------------
# Layouts


def _is_hidden(name: str) -> bool:
    return any(part.startswith(".") for part in name.split("/"))


def index_source(
    dataset: str,
    source: str,
    *,
    labels: str | None = None,
    class_file: str | None = None,
    spool_dir: str | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
    split: str | None = None,
    drop_unannotated: bool = False,
) -> SourceIndex:
    """Index `source` in the layout `dataset` (one of DATASETS). `split` and `drop_unannotated` are for the
    dense layouts (vfm.data.dense_sources.index_dense), which hold several splits in one release."""
    if dataset not in DATASETS:
        raise SourceError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset in DENSE_DATASETS:
        from vfm.data.dense_sources import index_dense

        return index_dense(dataset, source, split=split, labels=labels, progress=progress,
                           drop_unannotated=drop_unannotated)
    if not (_sources_in(source) if storage.is_s3(source) else os.path.exists(source)):
        raise SourceError(f"--source {source} does not exist")
    if dataset in ("in22k-fall11", "in21k-winter21", "in1k"):
        return _index_tar_of_tars(dataset, source, class_file, spool_dir, progress)
    if dataset == "in1k-val":
        if not labels:
            raise SourceError("in1k-val needs --labels LOC_val_solution.csv or ILSVRC2012_devkit_t12.tar.gz")
        return _index_val(source, load_val_labels(labels), class_file, progress)
    if dataset == "imagenet-r":
        return _index_tree(dataset, source, list(class_lists.in1k_wnids()), progress,
                           parse=lambda parts: (parts[-2], "", {}) if len(parts) >= 2 else None,
                           allowed=set(class_lists.imagenet_r_wnids()))
    if dataset == "imagenet-c":
        return _index_tree(dataset, source, list(class_lists.in1k_wnids()), progress, parse=_parse_imagenet_c)
    # folder: classes are the sorted top-level folders unless a class file fixes them
    if not os.path.isdir(source):
        raise SourceError(f"folder layout needs a directory <root>/<class>/<image>; {source} is not a directory")
    found = sorted(d.name for d in os.scandir(source) if d.is_dir() and not d.name.startswith("."))
    names = class_lists.read_class_file(class_file) if class_file else found
    if not names:
        raise SourceError(f"{source}: no class folders found (expected <root>/<class>/<image>)")
    return _index_tree("folder", source, names, progress,
                       parse=lambda parts: (parts[0], "", {}) if len(parts) >= 2 else None)


def _parse_imagenet_c(parts: list[str]):
    if len(parts) < 4 or not parts[-3].isdigit():
        return None
    corruption, severity = parts[-4], int(parts[-3])
    return parts[-2], f"{corruption}/{severity}", {"corruption": corruption, "severity": severity}


def _sources_in(source: str) -> list[str]:
    """A tar file, a directory of tarballs (ImageNet-C's five), or an extracted directory tree; on S3 an
    archive or a prefix of tarballs."""
    if storage.is_s3(source):
        if storage.exists(source):
            return [source]
        tars = [u for u in storage.list_prefix(source) if u.endswith(".tar") and "/" not in u[len(source.rstrip("/")) + 1:]]
        if not tars:
            raise SourceError(f"--source {source}: no object there and no .tar objects under it; an S3 source is "
                              "an archive (s3://bucket/fall11_whole.tar) or a prefix of tarballs (ImageNet-C's five)")
        return tars
    if os.path.isfile(source):
        return [source]
    tars = sorted(str(p) for p in Path(source).iterdir() if p.suffix == ".tar" and p.is_file())
    return tars or [source]


def _index_tree(dataset, source, names, progress, parse, allowed: set[str] | None = None) -> SourceIndex:
    index = SourceIndex(dataset=dataset, classes=list(names))
    label_of = {w: i for i, w in enumerate(names)}
    for src in _sources_in(source):
        fid = index.add_file(src)
        progress(os.path.basename(src))
        walker = walk_dir(src) if os.path.isdir(src) else walk_tar(src)
        for name, offset, size in walker:
            if _is_hidden(name):
                continue
            parsed = parse(name.split("/"))
            if parsed is None:
                index.fail(name, src, f"path does not match the {dataset} layout")
                continue
            wnid, group_name, meta = parsed
            _add_checked(index, fid, offset, size, name, wnid, label_of, src, allowed,
                         index.group_id(group_name, meta))
    return index


def _add_checked(index, fid, offset, size, name, wnid, label_of, src, allowed=None, group=0) -> None:
    if wnid not in label_of or (allowed is not None and wnid not in allowed):
        index.fail(name, src, f"unknown wnid {wnid!r} (not in the {index.dataset} class list)")
    elif size == 0:
        index.fail(name, src, "zero-byte image")
    else:
        index.add(fid, offset, size, label_of[wnid], name, group)


def _index_tar_of_tars(dataset, source, class_file, spool_dir, progress) -> SourceIndex:
    if os.path.isdir(source):
        found = sorted(d.name for d in os.scandir(source) if d.is_dir())
        names = _tar_of_tars_classes(dataset, class_file, found)
        return _index_tree(dataset, source, names, progress,
                           parse=lambda parts: (parts[0], "", {}) if len(parts) >= 2 else None)
    path = source
    if source.endswith(".gz"):
        progress(f"decompressing {os.path.basename(source)} into a seekable spool file")
        path = gunzip_to_spool(source, spool_dir, lambda _n: None)
    entries = []
    probe = SourceIndex(dataset=dataset, classes=[])
    for name, offset, size in walk_tar_of_tars(path, probe, progress):
        entries.append((name, offset, size))
    found = sorted({n.split("/", 1)[0] for n, _, _ in entries})
    index = SourceIndex(dataset=dataset, classes=_tar_of_tars_classes(dataset, class_file, found))
    index.failures.extend(probe.failures)
    fid = index.add_file(path)
    label_of = {w: i for i, w in enumerate(index.classes)}
    for name, offset, size in entries:
        _add_checked(index, fid, offset, size, name, name.split("/", 1)[0], label_of, source)
    return index


def _tar_of_tars_classes(dataset: str, class_file: str | None, found: list[str]) -> list[str]:
    if class_file:
        return class_lists.read_class_file(class_file)
    if dataset == "in22k-fall11":
        return list(class_lists.in22k_wnids())
    if dataset == "in1k":
        return list(class_lists.in1k_wnids())
    # winter21 has no published list: its sorted per-class tars are the class list
    return found


def _index_val(source, wnid_of: dict[str, str], class_file, progress) -> SourceIndex:
    names = class_lists.read_class_file(class_file) if class_file else list(class_lists.in1k_wnids())
    index = SourceIndex(dataset="in1k-val", classes=names)
    label_of = {w: i for i, w in enumerate(names)}
    for src in _sources_in(source):
        fid = index.add_file(src)
        progress(os.path.basename(src))
        for name, offset, size in (walk_dir(src) if os.path.isdir(src) else walk_tar(src)):
            if _is_hidden(name):
                continue
            stem = Path(name).name.split(".")[0]
            if stem not in wnid_of:
                index.fail(name, src, "no ground-truth label for this image in --labels")
                continue
            _add_checked(index, fid, offset, size, name, wnid_of[stem], label_of, src)
    return index
