"""ADE20K and COCO 2017 in their official layouts (zips written here by vfm.data.dense_synthetic, then tampered
with) -> `vfm shard` -> read back through the loader's sample reader: pairing, bad input reported, zip codecs,
extracted trees, the CLI and resume."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.archives import bad_member
from vfm.data.ade20k_classes import OBJECT_INFO_150
from vfm.data.dense_sources import dense_split
from vfm.data.dense_synthetic import (
    ADE_CLASS_OF,
    COCO_CATEGORIES,
    ade20k_mask,
    write_ade20k_zip,
    write_coco_zips,
)
from vfm.data.loader import slot_stream, split_sample
from vfm.data.manifest import Manifest
from vfm.data.shard import write_dataset
from vfm.data.sources import SourceError, index_source


def read_all(manifest: Manifest) -> list[dict]:
    return list(slot_stream(manifest, slot=0, num_slots=1, seed=0, shuffle=False, shuffle_buffer=0, start=0,
                            repeat=False))


def shard(dataset: str, source, dest, split: str, **kw) -> tuple[Manifest, list[dict]]:
    index = index_source(dataset, str(source), split=split, labels=kw.pop("labels", None),
                         drop_unannotated=kw.pop("drop_unannotated", False))
    report = write_dataset(index, str(dest), split=dense_split(dataset, split)[0], shard_size=kw.pop("shard_size", 10**9), **kw)
    assert report.manifest is not None
    m = Manifest.load(str(dest))
    return m, read_all(m)


def members_of(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def rezip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, compression)
    return path


def extract(zips: list[Path], root: Path) -> Path:
    for z in zips:
        with zipfile.ZipFile(z) as zf:
            zf.extractall(root)
    return root


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")  # uint8 HxWx3: RGB; uint16 HxW: 16-bit grayscale
    return out.getvalue()


def sample_bytes(samples: list[dict]) -> dict[str, dict[str, bytes]]:
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in samples}


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ade")
    drawn = write_ade20k_zip(root / "ADEChallengeData2016.zip", n_train=6, n_val=3, size=40, seed=1)
    return root / "ADEChallengeData2016.zip", drawn


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict[str, Path]:
    return write_coco_zips(tmp_path_factory.mktemp("coco"), n_train=8, n_val=4, size=40, seed=2)


def test_ade20k_pairs_every_image_with_its_mask(ade, tmp_path):
    src, drawn = ade
    zipped = members_of(src)
    m, samples = shard("ade20k", src, tmp_path / "train", "train", shard_size=3000)
    assert m.task == "semantic_segmentation" and m.split == "train" and len(m.shards) > 1
    assert m.classes == list(OBJECT_INFO_150) and m.num_classes == 150 and m.failures == []
    assert m.categories[0] == {"id": 1, "name": "wall"} and m.categories[149] == {"id": 150, "name": "flag"}
    assert sorted(s["__key__"] for s in samples) == [f"images/training/ADE_train_{k:08d}" for k in range(1, 7)]
    for s in samples:
        stem = s["__key__"].rsplit("/", 1)[1]
        assert set(s) == {"__key__", "__url__", "jpg", "seg.png", "json"}  # no .cls: a mask is the label
        assert s["jpg"] == zipped[f"ADEChallengeData2016/images/training/{stem}.jpg"]  # bytes as they are
        assert s["seg.png"] == zipped[f"ADEChallengeData2016/annotations/training/{stem}.png"]
        mask = np.asarray(Image.open(io.BytesIO(s["seg.png"])))
        assert sorted(np.unique(mask).tolist()) == drawn["training"][stem]
        assert {0, 1} < set(drawn["training"][stem]) <= {0, 1, *ADE_CLASS_OF.values()}  # border, wall, shapes
        assert mask.shape == Image.open(io.BytesIO(s["jpg"])).size[::-1]
        assert json.loads(s["json"]) == {"name": f"images/training/{stem}.jpg", "source": "ADEChallengeData2016",
                                         "mask": f"annotations/training/{stem}.png", "width": mask.shape[1],
                                         "height": mask.shape[0]}
    m_val, val = shard("ade20k", src, tmp_path / "val", "val")
    assert m_val.split == "validation" and sorted(s["__key__"].rsplit("/", 1)[1] for s in val) == sorted(
        drawn["validation"])


def test_seg_png_is_one_member_to_the_loader(ade, tmp_path):
    """webdataset splits a member name at the first dot of its basename, so `<key>.seg.png` is extension
    `seg.png` of `<key>`, beside `<key>.jpg`; the loader's own sample splitter agrees."""
    from webdataset.tariterators import base_plus_ext

    from vfm.data.shard import SampleTar

    assert base_plus_ext("images/training/ADE_train_00000001.seg.png") == (
        "images/training/ADE_train_00000001", "seg.png")
    buf = io.BytesIO()
    SampleTar(buf).write("images/training/ADE_train_00000001", {"jpg": b"i", "seg.png": b"m", "json": b"{}"})
    sample = split_sample(buf.getvalue(), "mem", 0)
    assert {k: sample[k] for k in ("__key__", "jpg", "seg.png", "json")} == {
        "__key__": "images/training/ADE_train_00000001", "jpg": b"i", "seg.png": b"m", "json": b"{}"}


def test_stored_deflated_and_extracted_ade20k_give_the_same_shards(ade, tmp_path):
    src, _ = ade
    (tmp_path / "stored").mkdir()
    stored = rezip(tmp_path / "stored" / "ADEChallengeData2016.zip", members_of(src), zipfile.ZIP_STORED)
    tree = extract([src], tmp_path / "tree")
    runs = {name: shard("ade20k", source, tmp_path / name, "train")
            for name, source in (("deflated", src), ("stored", stored), ("extracted", tree),
                                 ("release_folder", tree / "ADEChallengeData2016"))}
    index = index_source("ade20k", str(src), split="train")
    assert all(index.codec[i] for i in range(len(index)))  # the synthetic zip deflates: the inflate path ran
    assert not any(index_source("ade20k", str(stored), split="train").codec)
    first = runs["deflated"]
    for m, samples in runs.values():
        assert sample_bytes(samples) == sample_bytes(first[1])
        assert [(s.num_samples, s.sha256) for s in m.shards] == [(s.num_samples, s.sha256) for s in first[0].shards]


def test_ade20k_bad_input_is_skipped_and_reported(ade, tmp_path):
    src, _ = ade
    members = members_of(src)
    good_mask = members["ADEChallengeData2016/annotations/training/ADE_train_00000001.png"]
    good_image = members["ADEChallengeData2016/images/training/ADE_train_00000001.jpg"]
    width, height = Image.open(io.BytesIO(good_image)).size
    img, ann = "ADEChallengeData2016/images/training/ADE_train_{:08d}.jpg", \
        "ADEChallengeData2016/annotations/training/ADE_train_{:08d}.png"
    bad = {
        101: (good_image, None, "image without its mask"),
        102: (None, good_mask, "mask without its image"),
        103: (good_image, ade20k_mask(width + 4, height, []), f"is {width + 4}x{height} but its image is"),
        104: (good_image, png(np.zeros((height, width, 3), np.uint8)), "8-bit RGB PNG, not 8-bit single"),
        105: (good_image, png(np.zeros((height, width), np.uint16)), "16-bit grayscale PNG"),
        106: (good_image, good_mask[:-20], "no PNG end chunk"),
        107: (good_image, b"not a png", "is not a PNG"),
        108: (bad_member("garbage"), good_mask, "undecodable image"),
        109: (bad_member("truncated"), good_mask, "undecodable image"),
        110: (b"", good_mask, "zero-byte image"),
        111: (good_image, b"", "zero-byte mask"),
    }
    for k, (image, mask, _) in bad.items():
        if image is not None:
            members[img.format(k)] = image
        if mask is not None:
            members[ann.format(k)] = mask
    members["ADEChallengeData2016/images/training/notes.txt"] = b"not an image"
    damaged = rezip(tmp_path / "ADEChallengeData2016.zip", members)
    # a damaged deflate stream: flip bytes inside one good image's compressed data (the zip's CRC-32 catches it)
    index = index_source("ade20k", str(damaged), split="train")
    victim = next(i for i in range(len(index)) if index.name(i).endswith("ADE_train_00000002.jpg"))
    raw = bytearray(damaged.read_bytes())
    at = index.offset[victim] + index.size[victim] // 2
    raw[at:at + 8] = bytes(b ^ 0xFF for b in raw[at:at + 8])
    damaged.write_bytes(bytes(raw))

    m, samples = shard("ade20k", damaged, tmp_path / "out", "train", workers=2, shard_size=2000)
    keys = sorted(s["__key__"] for s in samples)
    assert keys == [f"images/training/ADE_train_{k:08d}" for k in (1, 3, 4, 5, 6)]  # the good ones, all of them
    reasons = {f["name"]: f["reason"] for f in m.failures}
    for k, (image, _, reason) in bad.items():
        name = f"images/training/ADE_train_{k:08d}.jpg" if image is not None else \
            f"annotations/training/ADE_train_{k:08d}.png"
        assert reason in reasons.pop(name), (k, reasons.get(name))
    assert "damaged" in reasons.pop("images/training/ADE_train_00000002.jpg")  # zlib error or CRC-32 mismatch
    assert "not a images/training/*.jpg image" in reasons.pop("images/training/notes.txt")
    assert reasons == {}
    assert all(set(f) == {"key", "name", "source", "reason", "action"} and f["action"] == "skipped"
               for f in m.failures)
    assert m.failure_counts()


def coco_instances(coco: dict[str, Path], split: str) -> dict:
    with zipfile.ZipFile(coco["annotations"]) as zf:
        return json.loads(zf.read(f"annotations/instances_{split}.json"))


def test_coco2017_pairs_every_image_with_its_annotations(coco, tmp_path):
    for split, official in (("train", "train2017"), ("val", "val2017")):
        d = coco_instances(coco, official)
        m, samples = shard("coco2017", coco[official], tmp_path / split, split, labels=str(coco["annotations"]))
        assert m.task == "object_detection" and m.failures == [] and m.categories == COCO_CATEGORIES
        assert m.classes == ["person", "car", "dog"] and m.num_samples == len(d["images"])
        images = {f"{official}/{i['file_name'][:-4]}": i for i in d["images"]}
        zipped = members_of(coco[official])
        assert sorted(s["__key__"] for s in samples) == sorted(images)
        empty = 0
        for s in samples:
            assert set(s) == {"__key__", "__url__", "jpg", "json"}
            entry, record = images[s["__key__"]], json.loads(s["json"])
            assert s["jpg"] == zipped[f"{official}/{entry['file_name']}"]
            assert Image.open(io.BytesIO(s["jpg"])).size == (record["width"], record["height"])
            expected = [a for a in d["annotations"] if a["image_id"] == entry["id"]]
            assert record == {"image_id": entry["id"], "file_name": entry["file_name"], "width": entry["width"],
                              "height": entry["height"], "annotations": expected}  # original fields, bbox and all
            for a in record["annotations"]:
                x, y, w, h = a["bbox"]
                xs, ys = a["segmentation"][0][0::2], a["segmentation"][0][1::2]
                assert (x, y) == (min(xs), min(ys)) and abs(x + w - max(xs)) < 0.02 and abs(y + h - max(ys)) < 0.02
            empty += not expected
        assert empty >= 1  # images without annotations are kept (they count in AP)
    m, _ = shard("coco2017", coco["val2017"], tmp_path / "dropped", "val", labels=str(coco["annotations"]),
                 drop_unannotated=True)
    assert m.num_samples == len([i for i in coco_instances(coco, "val2017")["images"]
                                 if any(a["image_id"] == i["id"] for a in coco_instances(coco, "val2017")["annotations"])])
    assert {f["action"] for f in m.failures} == {"filtered"}


def test_coco2017_extracted_and_stored_give_the_same_shards(coco, tmp_path):
    root = extract([coco["val2017"], coco["annotations"]], tmp_path / "coco")
    stored = rezip(tmp_path / "val2017.zip", members_of(coco["val2017"]), zipfile.ZIP_STORED)
    a, sa = shard("coco2017", coco["val2017"], tmp_path / "zip", "val", labels=str(coco["annotations"]))
    b, sb = shard("coco2017", root, tmp_path / "root", "val")  # annotations/ beside val2017/: no --labels needed
    c, sc = shard("coco2017", root / "val2017", tmp_path / "folder", "val2017",
                  labels=str(root / "annotations" / "instances_val2017.json"))
    d, sd = shard("coco2017", stored, tmp_path / "stored", "val", labels=str(root / "annotations"))
    for m, samples in ((b, sb), (c, sc), (d, sd)):
        assert sample_bytes(samples) == sample_bytes(sa)
        assert [s.sha256 for s in m.shards] == [s.sha256 for s in a.shards]


def test_coco2017_bad_input_is_skipped_and_reported(coco, tmp_path):
    d = coco_instances(coco, "train2017")
    images = members_of(coco["train2017"])
    first, second, third, fourth = d["images"][:4]
    d["annotations"].append({**d["annotations"][0], "id": 999_001, "image_id": 123_456_789})  # no such image
    d["images"].append({**first, "id": 700_001, "file_name": "000000700001.jpg"})  # not in the archive
    images["train2017/000000700002.jpg"] = images[f"train2017/{first['file_name']}"]  # not in `images`
    images[f"train2017/{second['file_name']}"] = bad_member("truncated")
    images[f"train2017/{third['file_name']}"] = b""
    fourth["width"] += 3  # the header says otherwise
    labels = rezip(tmp_path / "annotations_trainval2017.zip", {"annotations/instances_train2017.json":
                                                              json.dumps(d).encode()})
    src = rezip(tmp_path / "train2017.zip", images)
    m, samples = shard("coco2017", src, tmp_path / "out", "train", labels=str(labels), workers=2, shard_size=1500)
    reasons = {f["key"]: f["reason"] for f in m.failures}
    stem = lambda entry: f"train2017/{entry['file_name'][:-4]}"  # noqa: E731
    assert "image_id 123456789 is not in `images`" in reasons.pop("annotation/999001")
    assert "has no train2017/000000700001.jpg" in reasons.pop("train2017/000000700001")
    assert "not in the `images`" in reasons.pop("train2017/000000700002")
    assert "undecodable image" in reasons.pop(stem(second))
    assert reasons.pop(stem(third)) == "zero-byte image"
    assert f"says {fourth['width']}x{fourth['height']}" in reasons.pop(stem(fourth))
    assert reasons == {}
    assert sorted(s["__key__"] for s in samples) == sorted(
        stem(i) for i in d["images"][:8] if i not in (second, third, fourth))


def test_cli_shards_both_and_a_rerun_resumes(ade, coco, tmp_path):
    from typer.testing import CliRunner

    from vfm.cli import app

    runner = CliRunner()
    for args in (["ade20k", "--source", str(ade[0]), "--split", "train"],
                 ["coco2017", "--source", str(coco["val2017"]), "--labels", str(coco["annotations"]),
                  "--split", "val"]):
        dest = tmp_path / args[0]
        cmd = ["shard", *args, "--dest", str(dest), "--shard-size", "2KB", "--workers", "2"]
        result = runner.invoke(app, cmd)
        assert result.exit_code == 0, result.output
        first = (dest / "manifest.json").read_text()
        m = Manifest.load(str(dest))
        assert m.dataset == args[0] and len(m.shards) > 1
        (dest / "manifest.json").unlink()  # as if the run had stopped before its commit: every shard is kept
        result = runner.invoke(app, cmd)
        assert result.exit_code == 0 and f"kept {len(m.shards)} verified" in result.output, result.output
        assert (dest / "manifest.json").read_text() == first
        assert "already complete" in runner.invoke(app, cmd).output
    result = runner.invoke(app, ["shard", "ade20k", "--source", str(ade[0]), "--dest", str(tmp_path / "x")])
    assert result.exit_code != 0


def test_split_and_source_errors_name_the_fix(ade, coco, tmp_path):
    with pytest.raises(SourceError, match="needs --split train or val"):
        index_source("ade20k", str(ade[0]))
    with pytest.raises(SourceError, match="needs --labels annotations_trainval2017.zip"):
        index_source("coco2017", str(coco["val2017"]), split="val")
    with pytest.raises(SourceError, match="no ADEChallengeData2016/images/training"):
        index_source("ade20k", str(coco["val2017"]), split="train")
    with pytest.raises(SourceError, match="sharded whole|no single class"):
        from vfm.data.sources import subset_index

        subset_index(index_source("ade20k", str(ade[0]), split="val"), num_classes=2)


def test_classification_manifests_are_unchanged_and_old_ones_load(tmp_path):
    from vfm.data.manifest import ShardInfo

    m = Manifest(dataset="in1k", split="train", classes=["a"], shards=[ShardInfo("s.tar", 1, 2, "h")])
    text = m.to_json()
    assert '"task"' not in text and '"categories"' not in text  # as written before dense tasks existed
    old = Manifest.from_json(text)
    assert old.task == "classification" and old.categories == []
