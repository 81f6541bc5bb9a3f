"""One place for every byte vfm moves: local paths and `s3://bucket/key` URLs (shards, manifests,
exports, checkpoints, run records).

S3 goes through boto3 with an explicit endpoint (AWS, MinIO, Ceph, the embedded moto server), retries in
`standard` mode by default (`adaptive` adds client-side rate limiting for readers that hit SlowDown) and
multipart uploads above `MULTIPART_THRESHOLD`. A multipart upload creates no object until it completes,
and local writes go to a temporary name that is renamed, so a reader never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024
READ_CHUNK = 8 * 1024 * 1024


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"not an s3://bucket/key URL: {url!r}")
    return bucket, key


def join(base: str, name: str) -> str:
    if is_s3(base):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def parent(url: str) -> str:
    if is_s3(url):
        return url.rsplit("/", 1)[0]
    return str(Path(url).parent)


def default_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_client(endpoint_url: str | None = None, retry_mode: str = "standard", max_attempts: int = 8):
    """The boto3 S3 client every reader/writer uses, for `endpoint_url` or the configured endpoint.

    The default endpoint is read from the environment on every call, so a process that points
    AWS_ENDPOINT_URL_S3 elsewhere (a test's fresh server) never reuses a client of the old one.
    """
    return _cached_client(endpoint_url or default_endpoint(), retry_mode, max_attempts)


@functools.lru_cache(maxsize=16)
def _cached_client(endpoint_url: str | None, retry_mode: str, max_attempts: int):
    """One client per process and settings. Checksums are computed only when the operation requires
    them: S3-compatible stores (MinIO, Ceph) reject the CRC headers botocore >= 1.36 sends by default,
    and we verify sha256 ourselves."""
    import boto3
    from botocore.config import Config

    if retry_mode not in ("standard", "adaptive"):
        raise ValueError(f"retry_mode must be 'standard' or 'adaptive', got {retry_mode!r}")
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or default_endpoint(),
        config=Config(
            retries={"max_attempts": max_attempts, "mode": retry_mode},
            # concurrent ranged GETs (RangedFile read-ahead, a shard worker's sample reads) share this client;
            # botocore's default pool of 10 connections would serialise them
            max_pool_connections=64,
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def forget_clients() -> None:
    """Drop this process's S3 clients (a forked child must not share its parent's connections)."""
    _cached_client.cache_clear()


def _client(endpoint_url: str | None):
    return s3_client(endpoint_url)


def exists(url: str, endpoint_url: str | None = None) -> bool:
    if not is_s3(url):
        return Path(url).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(url)
    try:
        _client(endpoint_url).head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def read_bytes(url: str, endpoint_url: str | None = None) -> bytes:
    if not is_s3(url):
        return Path(url).read_bytes()
    bucket, key = split_s3(url)
    return _client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read()


def open_read(url: str, endpoint_url: str | None = None, *, start: int = 0, stop: int | None = None) -> BinaryIO:
    """A streaming binary reader of bytes [start, stop) (S3: one GetObject, ranged when a range is asked for,
    its body read as it arrives)."""
    if not is_s3(url):
        f = open(url, "rb")
        if start == 0 and stop is None:
            return f
        f.seek(start)
        return io.BufferedReader(_Window(f, None if stop is None else stop - start))
    bucket, key = split_s3(url)
    extra = {} if start == 0 and stop is None else {"Range": f"bytes={start}-{'' if stop is None else stop - 1}"}
    return _client(endpoint_url).get_object(Bucket=bucket, Key=key, **extra)["Body"]


class _Window(io.RawIOBase):
    """At most `size` bytes of an open file from its current position (a local ranged read)."""

    def __init__(self, f: BinaryIO, size: int | None):
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf)
        n = self.f.readinto(view if self.left is None else view[:self.left])
        if self.left is not None:
            self.left -= n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


@contextlib.contextmanager
def open_write(url: str, endpoint_url: str | None = None) -> Iterator[BinaryIO]:
    """A binary writer straight to `url`, whose object appears whole when the block ends, or not at all if it
    raises: on S3 a multipart upload streamed as it is written, locally a hidden temporary name in the same
    folder, renamed (a kill leaves an incomplete upload, which a bucket lifecycle rule expires, or that file)."""
    if is_s3(url):
        writer = MultipartWriter(url, endpoint_url)
        try:
            yield writer  # type: ignore[misc]
        except BaseException:
            writer.abort()
            raise
        writer.close()
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    f = open(tmp, "wb")
    try:
        yield f
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    f.close()
    os.replace(tmp, path)


def sha256_of(url: str, endpoint_url: str | None = None) -> tuple[str, int]:
    """Stream an object and return (sha256 hex, size in bytes)."""
    h = hashlib.sha256()
    n = 0
    with open_read(url, endpoint_url) as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def write_bytes(url: str, data: bytes, endpoint_url: str | None = None) -> None:
    if is_s3(url):
        bucket, key = split_s3(url)
        _client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def upload_file(local: str | Path, url: str, endpoint_url: str | None = None) -> None:
    """Publish a finished local file at `url` atomically (rename locally; multipart on S3)."""
    if is_s3(url):
        from boto3.s3.transfer import TransferConfig

        bucket, key = split_s3(url)
        cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK)
        _client(endpoint_url).upload_file(str(local), bucket, key, Config=cfg)
        return
    dest = Path(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(local, tmp)
    os.replace(tmp, dest)


def list_prefix(url: str, endpoint_url: str | None = None) -> Iterator[str]:
    """Every object/file URL under a prefix/directory (recursive), sorted."""
    if not is_s3(url):
        root = Path(url)
        if root.exists():
            yield from sorted(str(p) for p in root.rglob("*") if p.is_file())
        return
    yield from (u for u, _ in list_sizes(url, endpoint_url))


def list_sizes(url: str, endpoint_url: str | None = None) -> Iterator[tuple[str, int]]:
    """(URL, bytes) of every object/file under a prefix/directory (recursive), sorted: the sizes come with S3's
    listing, so no HEAD per object."""
    if not is_s3(url):
        for path in list_prefix(url):
            yield path, os.path.getsize(path)
        return
    bucket, key = split_s3(url)
    prefix = key.rstrip("/") + "/" if key else ""
    pages = _client(endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            yield f"s3://{bucket}/{obj['Key']}", int(obj["Size"])


def upload_dir(local: str | Path, url: str, endpoint_url: str | None = None) -> None:
    """Copy every file under the local directory `local` to the same relative names under `url`."""
    root = Path(local)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            upload_file(path, join(url, path.relative_to(root).as_posix()), endpoint_url)


def download_dir(url: str, local: str | Path, endpoint_url: str | None = None) -> None:
    """Copy every object under the prefix `url` into the local directory `local`, keeping relative names."""
    if not is_s3(url):
        shutil.copytree(url, local, dirs_exist_ok=True)
        return
    base = url.rstrip("/")
    for src in list_prefix(base, endpoint_url):
        dest = Path(local) / src[len(base) + 1:]
        dest.parent.mkdir(parents=True, exist_ok=True)
        bucket, key = split_s3(src)
        _client(endpoint_url).download_file(bucket, key, str(dest))


def delete(url: str, endpoint_url: str | None = None) -> None:
    """Remove one object or file; absent is fine."""
    if is_s3(url):
        bucket, key = split_s3(url)
        _client(endpoint_url).delete_object(Bucket=bucket, Key=key)
    else:
        Path(url).unlink(missing_ok=True)


def delete_prefix(url: str, endpoint_url: str | None = None) -> None:
    """Remove everything under a prefix / directory (S3: batched DeleteObjects, 1,000 keys a request)."""
    if not is_s3(url):
        shutil.rmtree(url, ignore_errors=True)
        return
    client = _client(endpoint_url)
    bucket, key = split_s3(url.rstrip("/"))
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/")
    for page in pages:
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


# --- ranged reads of one object (archives kept in object storage) -------------------------------------
# Own code rather than s3fs: s3fs pins aiobotocore, whose botocore conflicts with the boto3 vfm pins.
RANGE_BLOCK = 8 * 1024 * 1024
RANGE_READAHEAD = 8


def object_size(url: str, endpoint_url: str | None = None) -> int:
    if not is_s3(url):
        return os.path.getsize(url)
    bucket, key = split_s3(url)
    return int(_client(endpoint_url).head_object(Bucket=bucket, Key=key)["ContentLength"])


def read_range(url: str, offset: int, size: int, endpoint_url: str | None = None) -> bytes:
    """`size` bytes at `offset` (fewer at the end of the object): one ranged GET on S3, `pread` locally."""
    if size <= 0:
        return b""
    if not is_s3(url):
        fd = os.open(url, os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)
    from botocore.exceptions import ClientError

    bucket, key = split_s3(url)
    try:
        body = _client(endpoint_url).get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}")
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") == "InvalidRange":  # at or past the end
            return b""
        raise
    return body["Body"].read()


class RangedFile:
    """A read-only, seekable file over one S3 object, read by ranged GETs of `block` bytes.

    Reading forward (tarfile walking every header of a 1.3 TB archive) keeps the next `readahead` blocks in
    flight on a thread pool, so the index pass streams at the store's parallel bandwidth instead of one
    request's latency at a time; a seek elsewhere drops the read-ahead. Only the blocks in flight and the
    current one are held, so memory stays at (readahead + 1) × block."""

    def __init__(self, url: str, endpoint_url: str | None = None, *, block: int = RANGE_BLOCK,
                 readahead: int = RANGE_READAHEAD):
        from concurrent.futures import ThreadPoolExecutor

        self.url, self.endpoint_url, self.block, self.readahead = url, endpoint_url, block, readahead
        self.size = object_size(url, endpoint_url)
        self.pos = 0
        self.requests = 0
        self._pool = ThreadPoolExecutor(max(1, readahead), thread_name_prefix="ranged-read")
        self._blocks: dict[int, Any] = {}  # block number -> Future[bytes]

    def _fetch(self, n: int) -> bytes:
        self.requests += 1
        return read_range(self.url, n * self.block, self.block, self.endpoint_url)

    def _get(self, n: int) -> bytes:
        last = (self.size - 1) // self.block
        for ahead in range(n, min(n + self.readahead, last) + 1):
            if ahead not in self._blocks:
                self._blocks[ahead] = self._pool.submit(self._fetch, ahead)
        for old in [b for b in self._blocks if b < n or b > n + self.readahead]:
            self._blocks.pop(old).cancel()
        return self._blocks[n].result()

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        out = bytearray()
        while self.pos < end:
            b, within = divmod(self.pos, self.block)
            chunk = self._get(b)[within : within + end - self.pos]
            if not chunk:
                break
            out += chunk
            self.pos += len(chunk)
        return bytes(out)

    def readline(self, limit: int = -1) -> bytes:
        """Up to and including the next newline (pickle reads its protocol frames with it)."""
        out = bytearray()
        while self.pos < self.size and (limit < 0 or len(out) < limit):
            b, within = divmod(self.pos, self.block)
            chunk = self._get(b)[within:]
            cut = chunk.find(b"\n")
            take = len(chunk) if cut < 0 else cut + 1
            if limit >= 0:
                take = min(take, limit - len(out))
            out += chunk[:take]
            self.pos += take
            if cut >= 0 and take == cut + 1:
                break
        return bytes(out)

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        for f in self._blocks.values():
            f.cancel()
        self._blocks.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RangedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def move(url: str, new_url: str) -> None:
    """Rename one S3 object (server-side copy, then delete)."""
    src_bucket, src_key = split_s3(url)
    bucket, key = split_s3(new_url)
    _client(None).copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": src_bucket, "Key": src_key})
    delete(url)


class MultipartWriter(io.RawIOBase):
    """A write-only stream to one S3 object (DCP's shard files): parts of `MULTIPART_CHUNK` go up as they
    fill, so memory stays at one part; the object appears whole on close (CompleteMultipartUpload) or not
    at all (`abort`)."""

    def __init__(self, url: str, endpoint_url: str | None = None):
        super().__init__()
        self.bucket, self.key = split_s3(url)
        self.client = s3_client(endpoint_url)
        self.buf = bytearray()
        self.pos = 0
        self.parts: list[dict] = []
        self.upload_id: str | None = None

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def write(self, b) -> int:  # type: ignore[override]
        n = len(b)
        self.buf += b
        self.pos += n
        while len(self.buf) >= MULTIPART_CHUNK:
            self._upload(bytes(self.buf[: MULTIPART_CHUNK]))
            del self.buf[: MULTIPART_CHUNK]
        return n

    def _upload(self, data: bytes) -> None:
        if self.upload_id is None:
            self.upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
        n = len(self.parts) + 1
        etag = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n,
                                       Body=data)["ETag"]
        self.parts.append({"PartNumber": n, "ETag": etag})

    def close(self) -> None:
        if self.closed:
            return
        if self.upload_id is None:  # small: one PUT
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buf))
        else:
            if self.buf:
                self._upload(bytes(self.buf))
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                                  MultipartUpload={"Parts": self.parts})
        self.buf = bytearray()
        super().close()

    def abort(self) -> None:
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        self.buf = bytearray()
        io.RawIOBase.close(self)
