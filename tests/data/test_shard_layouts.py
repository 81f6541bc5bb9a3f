"""Fabricated archives in each official layout -> `vfm shard` to the S3 endpoint -> read back."""

from __future__ import annotations

import collections
import json

import pytest

from tests.helpers.archives import (
    BAD_MEMBERS,
    bad_member,
    class_images,
    tiny_jpeg,
    write_devkit,
    write_tar_of_tars,
    write_tree_tar,
)
from vfm import storage
from vfm.data import classes as class_lists
from vfm.data.archives import tar_bytes
from vfm.data.loader import slot_stream
from vfm.data.manifest import Manifest
from vfm.data.shard import write_dataset
from vfm.data.sources import SourceError, TruncatedArchiveError, index_source


def read_all(manifest: Manifest) -> list[dict]:
    """Every stored sample, straight from the shards (one reader slot, one pass, stored order)."""
    return list(slot_stream(manifest, slot=0, num_slots=1, seed=0, shuffle=False, shuffle_buffer=0, start=0,
                            repeat=False))


def shard_and_load(dataset, source, dest, endpoint, **kw) -> tuple[Manifest, list[dict]]:
    index = index_source(dataset, str(source), labels=kw.pop("labels", None))
    report = write_dataset(index, dest, endpoint_url=endpoint, shard_size=kw.pop("shard_size", 3000), **kw)
    assert report.manifest is not None
    m = Manifest.load(dest + "/manifest.json")
    return m, read_all(m)


def assert_checksums(m: Manifest) -> None:
    for i, s in enumerate(m.shards):
        assert storage.sha256_of(m.shard_url(i)) == (s.sha256, s.bytes)


def test_in22k_tar_of_tars_with_every_bad_member(tmp_path, s3_endpoint, bucket):
    wnids = ["n00004475", "n01440764", "n15102894"]  # first, an IN-1K class, last of the fall11 list
    content = {w: class_images(w, 5, seed=k) for k, w in enumerate(wnids)}
    for kind in BAD_MEMBERS:
        content["n01440764"][f"n01440764_bad_{kind}.JPEG"] = bad_member(kind)
    content["n99999999"] = class_images("n99999999", 2, seed=9)  # not a fall11 synset
    src = write_tar_of_tars(tmp_path / "fall11_whole.tar", content)

    m, samples = shard_and_load("in22k-fall11", src, f"s3://{bucket}/in22k", s3_endpoint, seed=3)

    assert m.classes == list(class_lists.in22k_wnids())
    good = {f"{w}/{w}_{i}": w for w in wnids for i in range(5)}
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == sorted(good) and len(keys) == len(set(keys)) == m.num_samples == 15
    for s in samples:
        info = json.loads(s["json"])
        assert int(s["cls"]) == m.classes.index(good[s["__key__"]]) == m.classes.index(info["wnid"])
        assert info["name"] == s["__key__"] + ".JPEG"
        assert s["jpg"] == content[info["wnid"]][info["name"].split("/")[1]]  # original bytes, no re-encode
    reasons = {f["name"]: f["reason"] for f in m.failures}
    for kind, (_, reason) in BAD_MEMBERS.items():
        assert reason in reasons[f"n01440764/n01440764_bad_{kind}.JPEG"], kind
    assert sum("unknown wnid 'n99999999'" in r for r in reasons.values()) == 2
    assert all(f["action"] == "skipped" for f in m.failures)
    assert_checksums(m)
    info = json.loads(storage.read_bytes(f"s3://{bucket}/in22k/_info.json"))
    assert info["splits"]["train"]["num_samples"] == 15
    assert info["splits"]["train"]["filenames"] == [s.name for s in m.shards]


def test_repair_keeps_fixable_members_and_reports_them(tmp_path):
    content = {"n01440764": {**class_images("n01440764", 2, 0), **{f"n01440764_bad_{k}.JPEG": bad_member(k)
                                                                 for k in ("gzip", "png", "cmyk", "zero")}}}
    src = write_tar_of_tars(tmp_path / "ILSVRC2012_img_train.tar", content)
    m, samples = shard_and_load("in1k", src, str(tmp_path / "out"), None, repair=True)
    by_key = {s["__key__"]: s for s in samples}
    assert by_key["n01440764/n01440764_bad_png"]["png"] == content["n01440764"]["n01440764_bad_png.JPEG"]
    assert by_key["n01440764/n01440764_bad_gzip"]["jpg"] == __import__("gzip").decompress(
        content["n01440764"]["n01440764_bad_gzip.JPEG"])
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(by_key["n01440764/n01440764_bad_cmyk"]["jpg"])).mode == "RGB"
    actions = {f["name"].split("_bad_")[1]: f["action"] for f in m.failures}
    assert actions == {"gzip.JPEG": "repaired", "png.JPEG": "repaired", "cmyk.JPEG": "repaired",
                       "zero.JPEG": "skipped"}
    assert m.num_samples == 5 and all(int(s["cls"]) == 0 for s in samples)


def test_in1k_val_with_loc_csv_and_with_devkit_agree(tmp_path, s3_endpoint, bucket):
    in1k = list(class_lists.in1k_wnids())
    wnids = [in1k[5], in1k[900], in1k[0]]
    members, truth = {}, {}
    for n in range(9):
        image_id = f"ILSVRC2012_val_{n + 1:08d}"
        members[f"{image_id}.JPEG"] = tiny_jpeg(n)
        truth[image_id] = wnids[n % 3]
    src = write_tree_tar(tmp_path / "ILSVRC2012_img_val.tar", members)
    csv_path = tmp_path / "LOC_val_solution.csv"
    csv_path.write_text("ImageId,PredictionString\n" + "".join(
        f"{k},{w} 1 2 3 4 {w} 5 6 7 8\n" for k, w in truth.items() if k != "ILSVRC2012_val_00000009"))
    # devkit ground truth is in meta.mat order (here: reversed IN-1K order), never sorted-wnid order
    meta_order = in1k[::-1]
    devkit = write_devkit(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", meta_order,
                          [meta_order.index(truth[k]) + 1 for k in sorted(truth)])

    m_csv, s_csv = shard_and_load("in1k-val", src, f"s3://{bucket}/val-csv", s3_endpoint, labels=str(csv_path),
                                  split="validation")
    m_dev, s_dev = shard_and_load("in1k-val", src, f"s3://{bucket}/val-dev", s3_endpoint, labels=str(devkit),
                                  split="validation")
    for samples in (s_csv, s_dev):
        for s in samples:
            assert int(s["cls"]) == in1k.index(truth[s["__key__"]])
    assert len(s_dev) == 9 and len(s_csv) == 8
    assert [f["reason"] for f in m_csv.failures] == ["no ground-truth label for this image in --labels"]
    assert_checksums(m_dev)


def test_imagenet_r_keeps_in1k_indices(tmp_path):
    r_wnids = list(class_lists.imagenet_r_wnids())
    in1k = list(class_lists.in1k_wnids())
    not_in_r = next(w for w in in1k if w not in r_wnids)
    members = {f"imagenet-r/{w}/art_{i}.jpg": tiny_jpeg(i + 10 * k) for k, w in enumerate(r_wnids[:3]) for i in range(3)}
    members[f"imagenet-r/{not_in_r}/x.jpg"] = tiny_jpeg(99)
    src = write_tree_tar(tmp_path / "imagenet-r.tar", members)
    m, samples = shard_and_load("imagenet-r", src, str(tmp_path / "out"), None)
    assert m.classes == in1k and m.num_samples == 9
    for s in samples:
        assert int(s["cls"]) == in1k.index(json.loads(s["json"])["wnid"])
    assert [f["name"] for f in m.failures] == [f"imagenet-r/{not_in_r}/x.jpg"]


def test_imagenet_c_tarballs_keep_corruption_and_severity(tmp_path, s3_endpoint, bucket):
    in1k = list(class_lists.in1k_wnids())
    src = tmp_path / "imagenet-c"
    src.mkdir()
    write_tree_tar(src / "noise.tar", {f"gaussian_noise/{s}/{in1k[c]}/ILSVRC2012_val_{c:08d}.JPEG": tiny_jpeg(c + s)
                                       for s in (1, 5) for c in range(3)})
    write_tree_tar(src / "blur.tar", {f"glass_blur/{s}/{in1k[c]}/ILSVRC2012_val_{c:08d}.JPEG": tiny_jpeg(c * s)
                                      for s in (2,) for c in range(4)})
    m, samples = shard_and_load("imagenet-c", src, f"s3://{bucket}/c", s3_endpoint, shard_size=10**9)
    assert m.groups == {"glass_blur/2": {"corruption": "glass_blur", "severity": 2},
                        "gaussian_noise/1": {"corruption": "gaussian_noise", "severity": 1},
                        "gaussian_noise/5": {"corruption": "gaussian_noise", "severity": 5}}
    assert len(m.shards) == 3 and {s.group for s in m.shards} == set(m.groups)  # a shard never mixes groups
    per = collections.Counter((json.loads(s["json"])["corruption"], json.loads(s["json"])["severity"]) for s in samples)
    assert per == {("gaussian_noise", 1): 3, ("gaussian_noise", 5): 3, ("glass_blur", 2): 4}
    sub = m.subset("gaussian_noise/5")
    assert sub.num_samples == 3 and all(json.loads(s["json"])["severity"] == 5 for s in read_all(sub))


def test_winter21_tar_gz_outer_archive(tmp_path):
    content = {w: class_images(w, 3, k) for k, w in enumerate(["n00004475", "n00005787"])}
    src = write_tar_of_tars(tmp_path / "winter21_whole.tar.gz", content, gz=True)
    index = index_source("in21k-winter21", str(src), spool_dir=str(tmp_path / "spool"))
    assert index.classes == ["n00004475", "n00005787"]  # no published list: the archive's sorted class tars
    report = write_dataset(index, str(tmp_path / "out"), shard_size=10**6)
    assert report.manifest.num_samples == 6


def test_folder_layout(tmp_path):
    from vfm.data.synthetic import make_synthetic_folder

    src = make_synthetic_folder(tmp_path / "src", num_classes=3, per_class=4, size=16, seed=0)
    (src / "n00000001" / "notes.txt").write_text("not an image")
    m, samples = shard_and_load("folder", src, str(tmp_path / "out"), None, shard_size=1500)
    assert m.classes == ["n00000000", "n00000001", "n00000002"] and m.num_samples == 12 and len(m.shards) > 2
    assert all(int(s["cls"]) == m.classes.index(s["__key__"].split("/")[0]) for s in samples)
    assert [f["name"] for f in m.failures] == ["n00000001/notes.txt"]


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_truncated_outer_archive_names_file_offset_and_resume(tmp_path, cut):
    content = {w: class_images(w, 3, k) for k, w in enumerate(["n00004475", "n01440764", "n15102894"])}
    full = write_tar_of_tars(tmp_path / "fall11_whole.tar", content).read_bytes()
    # the second class tar starts after one 512-byte header + the first class tar (padded)
    first = len(tar_bytes(content["n00004475"]))
    cut_at = 512 + first + 700 if cut == "mid_member" else 512 + first
    trunc = tmp_path / "fall11_whole.tar.part"
    trunc.write_bytes(full[:cut_at])
    with pytest.raises(TruncatedArchiveError) as e:
        index_source("in22k-fall11", str(trunc))
    msg = str(e.value)
    assert str(trunc) in msg and "byte offset" in msg and "rerun the same" in msg
    assert e.value.offset <= cut_at


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(SourceError, match="unknown dataset"):
        index_source("in23k", str(tmp_path))
    with pytest.raises(SourceError, match="needs --labels"):
        index_source("in1k-val", str(tmp_path))
    with pytest.raises(SourceError, match="does not exist"):
        index_source("folder", str(tmp_path / "nope"))


def test_a_shard_reads_its_window_in_archive_order_and_writes_the_planned_order(tmp_path, monkeypatch):
    """Each window of a shard's samples is read forward through the archive (file, then offset), as `tar` reads,
    and the shard still holds the samples in the planned (shuffled) order; a window bounds what a worker holds."""
    from vfm.data import shard as shard_mod
    from vfm.data.sources import SourceIndex

    content = {w: class_images(w, 6, seed=k) for k, w in enumerate(["n01440764", "n01443537"])}
    index = index_source("in1k", str(write_tar_of_tars(tmp_path / "ILSVRC2012_img_train.tar", content)))
    reads: list[int] = []
    real_read = SourceIndex.read
    monkeypatch.setattr(SourceIndex, "read", lambda self, i, fds=None: reads.append(i) or real_read(self, i, fds))
    sizes = list(index.size)
    window = sum(sorted(sizes)[-4:])  # about 4 samples a window: several windows in the one shard
    monkeypatch.setattr(shard_mod, "READ_WINDOW_BYTES", window)
    (planned,) = shard_mod.plan_shards(index, seed=0, shard_size=10**9, prefix="in1k")
    got = [i for i, _ in shard_mod._read_ahead(index, planned.entries, window)]
    assert got == planned.entries.tolist() and sorted(reads) == sorted(got)
    position = {(index.file_id[i], index.offset[i]): i for i in got}
    archive_order = [position[k] for k in sorted(position)]
    windows, start = [], 0  # the planned order cut where the running bytes cross a multiple of the window
    for n, _i in enumerate(got):
        if sum(sizes[j] for j in got[:n + 1]) - 1 >= (len(windows) + 1) * window:
            windows.append(got[start:n])
            start = n
    windows.append(got[start:])
    assert len(windows) > 2 and got != archive_order  # shuffled, so order matters
    at = 0
    for w in windows:  # each window's reads are its samples, sorted by where they sit in the archive
        assert reads[at:at + len(w)] == sorted(w, key=archive_order.index)
        at += len(w)
    report = write_dataset(index, str(tmp_path / "out"), shard_size=10**9)
    names = [s["__key__"] for s in read_all(Manifest.load(report.manifest.location))]
    assert names == [index.key(i) for i in planned.entries]
