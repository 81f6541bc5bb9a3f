"""Our own tar code agrees with tarfile and webdataset: the sharder's writer writes their bytes, the loader's
sample splitter and the index pass's header walk read what they read."""

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


def _tar(entries, fmt=tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tarfile_files(data: bytes) -> list[tuple[str, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]


def test_index_walk_reads_plain_tars_as_tarfile_does_and_hands_the_rest_to_it():
    """`plain_tar_files` (the index pass's header walk over each per-class tar) lists what tarfile lists for plain
    ustar and GNU tars, at an offset inside a bigger file, and returns None, so tarfile parses it, for everything
    it does not read itself: PAX and GNU long names, links, a damaged checksum."""
    from vfm.data.sources import plain_tar_files

    jpegs = [(f"n01440764/n01440764_{i}.JPEG", bytes([i]) * (700 * i + 1)) for i in range(6)]
    plain = {
        "ustar": _tar([("n01440764", None), *jpegs, ("empty.JPEG", b"")]),
        "gnu": _tar(jpegs, tarfile.GNU_FORMAT),
        "ustar prefix": _tar([("d" * 90 + "/" + "f" * 90 + ".JPEG", b"long path split into prefix and name")]),
        "empty": _tar([]),
    }
    plain["cut header"] = plain["ustar"][:512 * 3 + 100]  # tarfile, too, ends a listing at a short header
    for label, data in plain.items():
        padded = b"\xff" * 1536 + data + b"\xee" * 512  # the walk reads a window of the outer tar
        got = plain_tar_files(io.BytesIO(padded), 1536, len(data))
        assert got == _tarfile_files(data), label
    assert len(plain_tar_files(io.BytesIO(plain["ustar"]), 0, len(plain["ustar"]))) == 7  # the folder is not a file

    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        tf.addfile(tarfile.TarInfo("a.JPEG"), io.BytesIO(b""))
        info = tarfile.TarInfo("b.JPEG")
        info.type, info.linkname = tarfile.SYMTYPE, "a.JPEG"
        tf.addfile(info)
    damaged = bytearray(plain["ustar"])
    damaged[512 + 130] ^= 1  # a bit of the second header's size field: its checksum no longer holds
    others = {
        "pax long name": _tar([("x" * 120 + ".JPEG", b"1")], tarfile.PAX_FORMAT),
        "gnu long name": _tar([("x" * 120 + ".JPEG", b"1")], tarfile.GNU_FORMAT),
        "pax non-ascii": _tar([("n01440764/caf\u00e9.JPEG", b"1")], tarfile.PAX_FORMAT),
        "symlink": link.getvalue(),
        "damaged checksum": bytes(damaged),
    }
    for label, data in others.items():
        assert plain_tar_files(io.BytesIO(data), 0, len(data)) is None, label
