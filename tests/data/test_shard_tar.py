"""The sharder's tar writer writes the bytes tarfile (through webdataset's TarWriter) would write."""

from __future__ import annotations

import io
import tarfile

import webdataset as wds

from vfm.data.shard import SampleTar


def test_sample_tar_is_byte_identical_to_webdataset_tarwriter():
    samples = [(f"n01440764_{i}", {"jpg": bytes(range(256)) * (i + 1), "cls": str(i).encode(),
                                   "json": b'{"wnid": "n01440764"}'}) for i in range(5)]
    samples.append(("x" * 120, {"jpg": b"long name: a PAX header", "cls": b"0"}))  # beyond ustar's 100 bytes
    ours, theirs = io.BytesIO(), io.BytesIO()
    tar = SampleTar(ours)
    offsets = []
    for key, members in samples:
        offsets.append(tar.offset)
        tar.write(key, members)
    offsets.append(tar.offset)
    tar.close()
    with wds.TarWriter(theirs, encoder=False, mtime=0, user="vfm", group="vfm") as w:
        for key, members in samples:
            w.write({"__key__": key, **members})
    assert ours.getvalue() == theirs.getvalue()
    # `offset` before each sample is where its first member's header starts
    with tarfile.open(fileobj=io.BytesIO(ours.getvalue())) as tf:
        firsts = sorted({m.name.split(".")[0]: m.offset for m in reversed(tf.getmembers())}.values())
    assert firsts == offsets[:-1] and offsets[-1] < len(ours.getvalue())
