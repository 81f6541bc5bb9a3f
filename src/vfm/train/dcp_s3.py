"""DCP straight to and from S3: every rank writes its own shard files as multipart uploads and reads them back
by ranged GETs, so a checkpoint never goes through a local staging directory and a resume never downloads
the whole checkpoint to every node.

It follows DCP's own fsspec backend (torch/distributed/checkpoint/_fsspec_filesystem.py `FsspecWriter`,
`FsspecReader`: a `FileSystemBase` under the stock `FileSystemWriter`/`FileSystemReader`). Own code rather
than that backend: it needs s3fs, which pins aiobotocore, whose botocore conflicts with the boto3 vfm pins.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter

from vfm import storage


class _MultipartStream(io.RawIOBase):
    """A write-only stream to one S3 object: parts of `storage.MULTIPART_CHUNK` go up as they fill, the
    object appears whole on close (CompleteMultipartUpload) or not at all (`abort`)."""

    def __init__(self, url: str):
        super().__init__()
        self.bucket, self.key = storage.split_s3(url)
        self.client = storage.s3_client()
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
        while len(self.buf) >= storage.MULTIPART_CHUNK:
            self._upload(bytes(self.buf[: storage.MULTIPART_CHUNK]))
            del self.buf[: storage.MULTIPART_CHUNK]
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


class S3FileSystem(FileSystemBase):
    """DCP's file-system interface over `s3://bucket/prefix` URLs (no directories: prefixes)."""

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        url = str(path)
        if "r" in mode:
            with storage.RangedFile(url) as f:
                yield f  # type: ignore[misc]
            return
        stream = _MultipartStream(url)
        try:
            yield stream
        except BaseException:
            stream.abort()
            raise
        stream.close()

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def init_path(self, path: str | os.PathLike, **kwargs: object) -> str:
        return str(path).rstrip("/")

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        src_bucket, src_key = storage.split_s3(str(path))
        bucket, key = storage.split_s3(str(new_path))
        storage.s3_client().copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": src_bucket, "Key": src_key})
        storage.delete(str(path))

    def mkdir(self, path: str | os.PathLike) -> None:
        return None  # prefixes need no creating

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return storage.is_s3(str(checkpoint_id))

    def exists(self, path: str | os.PathLike) -> bool:
        return storage.exists(str(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        storage.delete(str(path))

    def ls(self, path: str | os.PathLike) -> list[str]:
        return list(storage.list_prefix(str(path)))


class S3Writer(FileSystemWriter):
    """Each rank's shards as objects under `path`; `.metadata` last (written to a temporary key, then copied)."""

    def __init__(self, path: str, **kwargs: object):
        # no fsync: an S3 object is durable once its PUT / CompleteMultipartUpload returns
        super().__init__(path, single_file_per_rank=True, sync_files=False, **kwargs)  # type: ignore[arg-type]
        self.fs = S3FileSystem()
        self.path = self.fs.init_path(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return S3FileSystem.validate_checkpoint_id(checkpoint_id)


class S3Reader(FileSystemReader):
    """Reads each rank's items by ranged GETs of the shard objects under `path`."""

    def __init__(self, path: str):
        super().__init__(path)
        self.fs = S3FileSystem()
        self.path = self.fs.init_path(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return S3FileSystem.validate_checkpoint_id(checkpoint_id)
