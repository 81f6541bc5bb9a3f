"""The sharder's tar writer writes the bytes tarfile (through webdataset's TarWriter) would write."""

from __future__ import annotations

import io
import itertools
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


def test_loader_splits_each_indexed_sample_as_webdataset_does():
    """`split_sample` (the loader's reader of one sample's bytes) gives webdataset's grouping of the same tar,
    PAX long names included, and names the shard and sample when a header is damaged."""
    import pytest
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from vfm.data.loader import split_sample

    samples = [(f"n01440764_{i}", {"jpg": bytes(range(256)) * (i + 1), "cls": str(i).encode(),
                                   "json": b'{"wnid": "n01440764"}'}) for i in range(4)]
    samples.append(("x" * 120, {"jpg": b"long name: a PAX header", "cls": b"0"}))
    buf = io.BytesIO()
    tar = SampleTar(buf)
    offsets = []
    for key, members in samples:
        offsets.append(tar.offset)
        tar.write(key, members)
    offsets.append(tar.offset)
    tar.close()
    data = buf.getvalue()
    expected = list(group_by_keys(tar_file_expander([{"url": "s.tar", "stream": io.BytesIO(data)}])))
    got = [split_sample(data[a:b], "s.tar", j) for j, (a, b) in enumerate(itertools.pairwise(offsets))]
    assert got == expected and got[-1]["__key__"] == "x" * 120
    damaged = bytearray(data[offsets[1]:offsets[2]])
    damaged[130] ^= 1  # one bit of the first member's size field
    with pytest.raises(ValueError, match=r"s\.tar: sample 1 has a damaged tar header"):
        split_sample(bytes(damaged), "s.tar", 1)
    with pytest.raises(ValueError, match="sample 0 holds members of two keys"):
        split_sample(data[offsets[0]:offsets[2]], "s.tar", 0)
