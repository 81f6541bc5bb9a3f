"""Archives kept in object storage: `vfm shard` reads `s3://` sources in place, by ranged GETs, and writes the
same shards as from a local copy."""

from __future__ import annotations

import pytest

from tests.data.test_shard_layouts import read_all
from tests.helpers.archives import class_images, tiny_jpeg, write_tar_of_tars, write_tree_tar
from vfm import storage
from vfm.data import classes as class_lists
from vfm.data.manifest import Manifest
from vfm.data.shard import write_dataset
from vfm.data.sources import SourceError, TruncatedArchiveError, index_source


def test_ranged_file_reads_across_blocks_with_read_ahead(tmp_path, s3_endpoint, bucket):
    data = bytes(range(256)) * 400  # 102,400 bytes
    url = f"s3://{bucket}/blob.bin"
    storage.write_bytes(url, data)
    with storage.RangedFile(url, block=4096, readahead=3) as f:
        assert f.size == len(data)
        assert f.read(10) == data[:10]
        f.seek(4090)
        assert f.read(20) == data[4090:4110]  # spans two blocks
        f.seek(-5, 2)
        assert f.read() == data[-5:] and f.read(3) == b""
        f.seek(0)
        before = f.requests
        assert f.read() == data
        assert f.requests - before <= -(-len(data) // 4096)  # a forward pass fetches each block at most once
    assert storage.read_range(url, 100, 50) == data[100:150]
    assert storage.read_range(url, len(data) - 2, 10) == data[-2:] and storage.read_range(url, len(data), 10) == b""


def test_fall11_on_s3_shards_like_the_local_copy(tmp_path, s3_endpoint, bucket):
    content = {w: class_images(w, 6, seed=k) for k, w in enumerate(["n00004475", "n01440764", "n15102894"])}
    local = write_tar_of_tars(tmp_path / "fall11_whole.tar", content)
    url = f"s3://{bucket}/raw/fall11_whole.tar"
    storage.upload_file(local, url)

    from_s3 = index_source("in22k-fall11", url)
    assert from_s3.files == [url] and len(from_s3) == 18
    out = {}
    for name, index in (("s3", from_s3), ("local", index_source("in22k-fall11", str(local)))):
        report = write_dataset(index, f"s3://{bucket}/in22k-{name}", endpoint_url=s3_endpoint, shard_size=3000,
                               seed=1, workers=2)
        out[name] = report.manifest
    assert [(s.name, s.sha256, s.num_samples) for s in out["s3"].shards] == \
           [(s.name, s.sha256, s.num_samples) for s in out["local"].shards]  # byte-identical shards
    samples = read_all(Manifest.load(f"s3://{bucket}/in22k-s3/manifest.json"))
    assert sorted(s["__key__"] for s in samples) == sorted(f"{w}/{w}_{i}" for w in content for i in range(6))


def test_imagenet_c_tarballs_under_an_s3_prefix(tmp_path, s3_endpoint, bucket):
    in1k = list(class_lists.in1k_wnids())
    for tar, corruption in (("noise.tar", "gaussian_noise"), ("blur.tar", "motion_blur")):
        path = write_tree_tar(tmp_path / tar, {f"{corruption}/3/{in1k[c]}/ILSVRC2012_val_{c:08d}.JPEG": tiny_jpeg(c)
                                               for c in range(3)})
        storage.upload_file(path, f"s3://{bucket}/imagenet-c/{tar}")
    storage.write_bytes(f"s3://{bucket}/imagenet-c/README.txt", b"not a tarball")
    index = index_source("imagenet-c", f"s3://{bucket}/imagenet-c")
    assert index.files == [f"s3://{bucket}/imagenet-c/blur.tar", f"s3://{bucket}/imagenet-c/noise.tar"]
    assert sorted(index.groups[1:]) == ["gaussian_noise/3", "motion_blur/3"] and len(index) == 6


def test_a_truncated_or_missing_s3_archive_is_named(tmp_path, s3_endpoint, bucket):
    content = {w: class_images(w, 3, k) for k, w in enumerate(["n00004475", "n01440764"])}
    full = write_tar_of_tars(tmp_path / "fall11_whole.tar", content).read_bytes()
    url = f"s3://{bucket}/raw/fall11_whole.tar.part"
    storage.write_bytes(url, full[: len(full) // 2])
    with pytest.raises(TruncatedArchiveError) as e:
        index_source("in22k-fall11", url)
    assert url in str(e.value) and "byte offset" in str(e.value)
    with pytest.raises(SourceError, match="no object there and no .tar objects under it"):
        index_source("in22k-fall11", f"s3://{bucket}/raw/absent.tar")
