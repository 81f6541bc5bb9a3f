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


class S3FileSystem(FileSystemBase):
    """DCP's file-system interface over `s3://bucket/prefix` URLs (no directories: prefixes)."""

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        url = str(path)
        if "r" in mode:
            with storage.RangedFile(url) as f:
                yield f  # type: ignore[misc]
            return
        stream = storage.MultipartWriter(url)
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
        storage.move(str(path), str(new_path))

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
