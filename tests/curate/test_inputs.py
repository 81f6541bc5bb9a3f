"""vfm.curate.inputs: every kind of `vfm curate` source indexed in place, on real data made here (tiny JPEG / PNG
files, tars, IN-22K's tar of tars, `vfm shard` output, an Open Images folder + id CSV), local and in the moto S3
server. Each test checks the exact set of entry names, that `index.read(i)` gives back each image's exact bytes,
that a zero-byte image is a `zero_bytes` failure, and that non-image and hidden files are left out."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from tests.helpers.archives import add_bytes, png_bytes, tar_bytes, tiny_jpeg, write_tar_of_tars
from vfm import storage
from vfm.curate.cli import parse_source
from vfm.curate.inputs import index_curate_source
from vfm.data.manifest import Manifest, ShardInfo
from vfm.data.sources import SourceError, SourceIndex
from vfm.recipes.schema import CurateSource
from vfm.services import S3_ENV_DEFAULTS, s3_server

NOT_IMAGES = {"notes.txt": b"hello", "meta.json": b"{}", "img.jpg.md5": b"abc", "Makefile": b"all:\n"}


def source(kind: str, path: str | Path, ids_csv: str | Path | None = None, name: str = "src") -> CurateSource:
    return CurateSource(name=name, kind=kind, path=str(path), ids_csv=None if ids_csv is None else str(ids_csv))


def contents(index: SourceIndex) -> dict[str, bytes]:
    """Entry name -> the bytes `index.read` gives (one entry per name: a duplicate name fails the test)."""
    names = [index.name(i) for i in range(len(index))]
    assert len(names) == len(set(names)), f"duplicate entry names: {sorted(names)}"
    with index.reading() as read:
        out = {index.name(i): read(i) for i in range(len(index))}
    assert out == {index.name(i): index.read(i) for i in range(len(index))}  # the one-off read path agrees
    assert set(index.label) <= {0}  # unlabelled
    return out


def failures(index: SourceIndex) -> dict[str, str]:
    return {f["name"]: f["reason"] for f in index.failures}


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def images(n: int, seed: int = 0) -> list[bytes]:
    return [tiny_jpeg(seed * 100 + i) for i in range(n)]


# --- folder ----------------------------------------------------------------------------------------------


def folder_tree() -> tuple[dict[str, bytes], dict[str, bytes], dict[str, str]]:
    """(files to write, the entries expected: name -> bytes, the failures expected: name -> reason)."""
    a, b, c, d, e, f = images(6)
    png = png_bytes(7)
    inner_tar = tar_bytes({"q.jpg": e, "./deeper/r.JPEG": f, "readme.md": b"# pack", ".s.jpg": a, "zero.jpg": b""})
    files = {
        "a.jpg": a, "cats/b.JPEG": b, "cats/deep/er/c.png": png, "dogs/d.webp": c, "dogs/e.jpeg": d,
        "empty.jpg": b"", "cats/.hidden.jpg": a, ".git/objects/x.jpg": b, "._a.jpg": b"\0\5\x16\7 AppleDouble",
        "packs/p.tar": inner_tar, "packs/._p.tar": b"\0\5\x16\7 AppleDouble, not a tar",
        **{f"misc/{k}": v for k, v in NOT_IMAGES.items()},
    }
    expected = {"a.jpg": a, "cats/b.JPEG": b, "cats/deep/er/c.png": png, "dogs/d.webp": c, "dogs/e.jpeg": d,
                "packs/p/q.jpg": e, "packs/p/deeper/r.JPEG": f}
    return files, expected, {"empty.jpg": "zero_bytes", "packs/p/zero.jpg": "zero_bytes"}


def test_folder_any_depth_with_a_nested_tar(tmp_path):
    files, expected, failed = folder_tree()
    root = write_files(tmp_path / "web", files)
    seen: list[str] = []
    index = index_curate_source(source("folder", root), progress=seen.append)
    assert contents(index) == expected
    assert failures(index) == failed
    assert "packs/p.tar" in seen  # the tar met in the folder is reported as it is read
    # a relative path resolves under the raw-data root, to the same index
    rel = index_curate_source(source("folder", "web"), raw_root=str(tmp_path))
    assert contents(rel) == expected and failures(rel) == failed


def test_folder_that_is_not_there_or_holds_no_images(tmp_path):
    for path in (tmp_path / "absent", tmp_path / "absent" / "deeper"):
        with pytest.raises(SourceError, match="not a directory") as e:
            index_curate_source(source("folder", path))
        assert str(path) in str(e.value)
    with pytest.raises(SourceError, match="not a directory"):  # a relative path missing under the raw root
        index_curate_source(source("folder", "web"), raw_root=str(tmp_path))
    a_file = write_files(tmp_path, {"one.jpg": tiny_jpeg(1)}) / "one.jpg"
    with pytest.raises(SourceError, match="not a directory"):
        index_curate_source(source("folder", a_file))
    texts = write_files(tmp_path / "texts", NOT_IMAGES)
    with pytest.raises(SourceError, match="no images found") as e:
        index_curate_source(source("folder", texts))
    assert str(texts) in str(e.value)


# --- tar -------------------------------------------------------------------------------------------------


def test_one_tar(tmp_path):
    a, b, c = images(3, seed=1)
    members = {"imagenet-r/n01443537/art_0.jpg": a, "./flat.JPEG": b, "x/y.png": c, "zero.jpg": b"",
               "x/.hidden.jpg": a, "._flat.JPEG": b"\0\5\x16\7", **NOT_IMAGES}
    path = tmp_path / "imagenet-r.tar"
    with tarfile.open(path, "w") as tf:
        tf.addfile(_dir_info("x"))  # a directory member too, as `tar cf` writes them
        for name, data in members.items():
            add_bytes(tf, name, data)
    index = index_curate_source(source("tar", path))
    assert contents(index) == {"imagenet-r/n01443537/art_0.jpg": a, "flat.JPEG": b, "x/y.png": c}
    assert failures(index) == {"zero.jpg": "zero_bytes"}


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_a_directory_of_tars(tmp_path):
    a, b, c, d = images(4, seed=2)
    write_files(tmp_path / "tars", {
        "one.tar": tar_bytes({"a.jpg": a, "z.jpg": b"", "n.txt": b"x"}),
        "two.tar": tar_bytes({"sub/b.jpg": b}),
        "train/part.tar": tar_bytes({"c.jpg": c}),  # the same tar name in two folders: their entries stay apart
        "val/part.tar": tar_bytes({"c.jpg": d}),
        "README.txt": b"not a tar", "loose.jpg": a, "._one.tar": b"\0\5\x16\7 AppleDouble",
    })
    index = index_curate_source(source("tar", tmp_path / "tars"))
    got = contents(index)
    assert got == {"one/a.jpg": a, "two/sub/b.jpg": b, "train/part/c.jpg": c, "val/part/c.jpg": d}
    assert failures(index) == {"one/z.jpg": "zero_bytes"}


def test_tar_that_is_not_there(tmp_path):
    for path in (tmp_path / "absent.tar", tmp_path / "absent"):
        with pytest.raises(SourceError) as e:
            index_curate_source(source("tar", path))
        assert str(path) in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no .tar files"):
        index_curate_source(source("tar", tmp_path / "empty"))


# --- wds -------------------------------------------------------------------------------------------------


def test_wds_shards_of_vfm_shard(tmp_path):
    from vfm.data.shard import write_dataset
    from vfm.data.sources import index_source

    originals = {f"cls{c}/img_{i}.jpg": tiny_jpeg(c * 10 + i) for c in range(2) for i in range(5)}
    folder = write_files(tmp_path / "folder", originals)
    report = write_dataset(index_source("folder", str(folder)), str(tmp_path / "shards"), split="train", seed=0,
                           max_samples_per_shard=4)
    m = report.manifest
    assert m is not None and len(m.shards) == 3
    for path in (tmp_path / "shards", Path(m.location)):  # the folder or its manifest.json
        index = index_curate_source(source("wds", path))
        got = contents(index)
        assert sorted(got.values()) == sorted(originals.values())  # the image member of each sample, exact bytes
        stems = {Path(s.name).name.removesuffix(".tar") for s in m.shards}
        assert {n.split("/", 1)[0] for n in got} == stems and all(n.endswith(".jpg") for n in got)
        assert {n.split("/", 1)[1] for n in got} == set(originals)  # no .cls / .json member is an entry
        assert index.failures == []


def test_wds_shard_with_zero_byte_hidden_and_other_members(tmp_path):
    a, b = images(2, seed=3)
    shard = tar_bytes({"k0.jpg": a, "k0.json": b"{}", "k0.cls": b"3", "k1.png": b, "k1.seg.png": b"",
                       "k2.jpg": b"", "k2.json": b"{}", ".k3.jpg": a, "k4.txt": b"t"})
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "curated-000000.tar").write_bytes(shard)
    manifest = Manifest(dataset="pool", split="train", classes=[], task="unlabelled",
                        shards=[ShardInfo(name="curated-000000.tar", num_samples=3, bytes=len(shard), sha256="0" * 64)])
    (tmp_path / "ds" / "manifest.json").write_text(manifest.to_json())
    index = index_curate_source(source("wds", tmp_path / "ds"))
    # k1.seg.png is a mask member (zero bytes here): no image to curate, and no failure either
    assert contents(index) == {"curated-000000/k0.jpg": a, "curated-000000/k1.png": b}
    assert failures(index) == {"curated-000000/k2.jpg": "zero_bytes"}


def test_wds_that_is_not_there(tmp_path):
    for path in (tmp_path / "absent", tmp_path / "absent" / "manifest.json"):
        with pytest.raises(SourceError) as e:
            index_curate_source(source("wds", path))
        assert "manifest" in str(e.value)


# --- in22k -----------------------------------------------------------------------------------------------


def test_in22k_tar_of_tars(tmp_path):
    wnids = ["n00004475", "n01440764", "n15102894"]  # first, an IN-1K class, last of the fall11 synsets
    content = {w: {f"{w}_{i}.JPEG": tiny_jpeg(k * 10 + i) for i in range(3)} for k, w in enumerate(wnids)}
    content["n01440764"].update({"n01440764_zero.JPEG": b"", "._n01440764_0.JPEG": b"\0\5\x16\7",
                                 "n01440764_list.txt": b"ids"})
    path = write_tar_of_tars(tmp_path / "fall11_whole.tar", content)
    seen: list[str] = []
    index = index_curate_source(source("in22k", path, name="in22k"), progress=seen.append)
    assert index.dataset == "in22k"
    assert contents(index) == {f"{w}/{n}": data for w in wnids for n, data in content[w].items()
                               if n.endswith("JPEG") and not n.startswith(".") and data}
    assert failures(index) == {"n01440764/n01440764_zero.JPEG": "zero_bytes"}
    assert seen == wnids
    with pytest.raises(SourceError) as e:
        index_curate_source(source("in22k", tmp_path / "absent.tar"))
    assert str(tmp_path / "absent.tar") in str(e.value)


def test_in22k_gz_extracted_and_a_damaged_class_tar(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spool"))  # where a .tar.gz is spooled
    (tmp_path / "spool").mkdir()
    content = {w: {f"{w}_{i}.JPEG": tiny_jpeg(k * 10 + i) for i in range(2)} for k, w in enumerate(["n00004475",
                                                                                                      "n01440764"])}
    expected = {f"{w}/{n}": data for w, members in content.items() for n, data in members.items()}
    gz = contents(index_curate_source(source("in22k", write_tar_of_tars(tmp_path / "fall11_whole.tar.gz", content,
                                                                         gz=True))))
    assert gz == expected
    extracted = write_files(tmp_path / "fall11", {f"{w}/{n}": d for w, m in content.items() for n, d in m.items()})
    assert contents(index_curate_source(source("in22k", extracted))) == expected
    path = tmp_path / "damaged.tar"
    with tarfile.open(path, "w") as tf:
        for w, members in content.items():
            add_bytes(tf, f"{w}.tar", tar_bytes(members))
        add_bytes(tf, "n15102894.tar", b"\x01 not a tar at all " * 40)
    index = index_curate_source(source("in22k", path))
    assert contents(index) == expected  # the other classes are read
    assert list(failures(index)) == ["n15102894/"] and "unreadable" in failures(index)["n15102894/"]


# --- openimages ------------------------------------------------------------------------------------------


def test_openimages_listed_images_only(tmp_path):
    a, b, c = images(3, seed=4)
    root = write_files(tmp_path / "oi", {
        "000a1249af2bc5f0.jpg": a, "000a1249af2bc5f1.jpg": b, "000a1249af2bc5f2.jpg": b"",
        "unlisted0000000.jpg": c, ".000a1249af2bc5f3.jpg": a, "notes.txt": b"x", **NOT_IMAGES,
    })
    ids = tmp_path / "train-images-boxable-with-rotation.csv"
    rows = ["ImageID,Subset,OriginalURL,Rotation"] + [f"{i},train,https://x/{i}.jpg,0.0" for i in (
        "000a1249af2bc5f0", "000a1249af2bc5f1", "000a1249af2bc5f2", "000a1249af2bc5f3", "000a1249af2bc5f0")]
    ids.write_text("\ufeff" + "\n".join(rows) + "\n")  # with the BOM some exports carry, and a repeated id
    index = index_curate_source(source("openimages", root, ids))
    assert contents(index) == {"000a1249af2bc5f0.jpg": a, "000a1249af2bc5f1.jpg": b}
    f = failures(index)
    assert f.pop("000a1249af2bc5f2.jpg") == "zero_bytes"
    assert list(f) == ["000a1249af2bc5f3.jpg"] and f["000a1249af2bc5f3.jpg"].startswith("missing")
    # relative paths (folder and CSV) resolve under the raw root
    rel = index_curate_source(source("openimages", "oi", ids.name), raw_root=str(tmp_path))
    assert contents(rel) == contents(index)


def test_openimages_bad_inputs_are_named(tmp_path):
    root = write_files(tmp_path / "oi", {"000a1249af2bc5f0.jpg": tiny_jpeg(1)})
    wrong = tmp_path / "class-descriptions.csv"
    wrong.write_text("LabelName,DisplayName\n/m/011k07,Tortoise\n")
    with pytest.raises(SourceError, match="no ImageID column") as e:
        index_curate_source(source("openimages", root, wrong))
    assert str(wrong) in str(e.value) and "LabelName" in str(e.value)
    ids = tmp_path / "ids.csv"
    ids.write_text("ImageID\n000a1249af2bc5f0\n")
    with pytest.raises(SourceError) as e:
        index_curate_source(source("openimages", root, tmp_path / "absent.csv"))
    assert str(tmp_path / "absent.csv") in str(e.value)
    with pytest.raises(SourceError, match="not a directory") as e:
        index_curate_source(source("openimages", tmp_path / "absent", ids))
    assert str(tmp_path / "absent") in str(e.value)


# --- s3:// -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """The suite's moto S3 server alone (vfm.services.s3_server, ~1 s), for conftest's `bucket`: the session
    `services` fixture would also start `mlflow server` (~50 s with its stop), which nothing here uses."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3_ENV_DEFAULTS.items():
            mp.setenv(k, os.environ.get(k, v))
        with s3_server() as url:
            yield url


@pytest.fixture
def s3(s3_endpoint, bucket, monkeypatch) -> str:
    """s3://<a fresh bucket> on the moto server, which the storage layer reaches through AWS_ENDPOINT_URL_S3."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    return f"s3://{bucket}"


def test_folder_under_an_s3_prefix(tmp_path, s3):
    files, expected, failed = folder_tree()
    storage.upload_dir(write_files(tmp_path / "web", files), f"{s3}/raw/web")
    storage.write_bytes(f"{s3}/raw/webby/other.jpg", tiny_jpeg(9))  # shares the prefix's text, not its folder
    for path in (f"{s3}/raw/web", f"{s3}/raw/web/"):
        index = index_curate_source(source("folder", path))
        assert contents(index) == expected  # one ranged GET per image / tar member
        assert failures(index) == failed
        assert all(storage.is_s3(f) for f in index.files)
    # a relative path stays under an s3:// raw root
    assert contents(index_curate_source(source("folder", "web"), raw_root=f"{s3}/raw")) == expected
    with pytest.raises(SourceError, match="no images found") as e:
        index_curate_source(source("folder", f"{s3}/raw/absent"))
    assert f"{s3}/raw/absent" in str(e.value)


def test_tar_in_s3_one_or_a_prefix_of_them(tmp_path, s3):
    a, b, c = images(3, seed=5)
    storage.write_bytes(f"{s3}/tars/one.tar", tar_bytes({"a.jpg": a, "z.jpg": b"", ".h.jpg": a, "n.txt": b"x"}))
    storage.write_bytes(f"{s3}/tars/two.tar", tar_bytes({"d/b.png": b}))
    storage.write_bytes(f"{s3}/tars/more/three.tar", tar_bytes({"c.jpg": c}))
    storage.write_bytes(f"{s3}/tars/README.txt", b"not a tar")
    storage.write_bytes(f"{s3}/tars/._one.tar", b"\0\5\x16\7 AppleDouble")
    one = index_curate_source(source("tar", f"{s3}/tars/one.tar"))
    assert contents(one) == {"a.jpg": a} and failures(one) == {"z.jpg": "zero_bytes"}
    assert one.files == [f"{s3}/tars/one.tar"]
    many = index_curate_source(source("tar", f"{s3}/tars"))
    assert contents(many) == {"one/a.jpg": a, "two/d/b.png": b, "more/three/c.jpg": c}
    assert failures(many) == {"one/z.jpg": "zero_bytes"}
    for absent in (f"{s3}/tars/absent.tar", f"{s3}/nothing"):
        with pytest.raises(SourceError) as e:
            index_curate_source(source("tar", absent))
        assert absent in str(e.value)


def test_in22k_in_s3(tmp_path, s3):
    content = {w: {f"{w}_{i}.JPEG": tiny_jpeg(k * 10 + i) for i in range(2)} for k, w in enumerate(["n00004475",
                                                                                                      "n01440764"])}
    content["n01440764"]["n01440764_zero.JPEG"] = b""
    storage.upload_file(write_tar_of_tars(tmp_path / "fall11_whole.tar", content), f"{s3}/raw/fall11_whole.tar")
    index = index_curate_source(source("in22k", "fall11_whole.tar"), raw_root=f"{s3}/raw")
    assert index.files == [f"{s3}/raw/fall11_whole.tar"]
    assert contents(index) == {f"{w}/{n}": d for w, m in content.items() for n, d in m.items() if d}
    assert failures(index) == {"n01440764/n01440764_zero.JPEG": "zero_bytes"}
    with pytest.raises(SourceError, match="no such file") as e:
        index_curate_source(source("in22k", f"{s3}/raw/absent.tar"))
    assert f"{s3}/raw/absent.tar" in str(e.value)


def test_openimages_in_s3(tmp_path, s3):
    a, b = images(2, seed=6)
    storage.write_bytes(f"{s3}/oi/train/000a1249af2bc5f0.jpg", a)
    storage.write_bytes(f"{s3}/oi/train/000a1249af2bc5f1.jpg", b)
    storage.write_bytes(f"{s3}/oi/train/unlisted00000000.jpg", b)
    storage.write_bytes(f"{s3}/oi/ids.csv", b"ImageID,Subset\n000a1249af2bc5f0,train\n000a1249af2bc5f1,train\n"
                                            b"000a1249af2bc5f9,train\n")
    index = index_curate_source(source("openimages", f"{s3}/oi/train", f"{s3}/oi/ids.csv"))
    assert contents(index) == {"000a1249af2bc5f0.jpg": a, "000a1249af2bc5f1.jpg": b}
    assert list(failures(index)) == ["000a1249af2bc5f9.jpg"]


# --- the --source text ------------------------------------------------------------------------------------


def test_parse_source():
    assert parse_source("web=folder:/data/web@0.5") == {"name": "web", "kind": "folder", "path": "/data/web",
                                                        "weight": 0.5}
    assert parse_source("oi=openimages:/d/oi,/d/ids.csv") == {"name": "oi", "kind": "openimages", "path": "/d/oi",
                                                              "ids_csv": "/d/ids.csv"}
    assert parse_source("x=tar:s3://b/p.tar") == {"name": "x", "kind": "tar", "path": "s3://b/p.tar"}
    assert parse_source("oi=openimages:s3://b/oi,s3://b/ids.csv@2") == {
        "name": "oi", "kind": "openimages", "path": "s3://b/oi", "ids_csv": "s3://b/ids.csv", "weight": 2.0}
    for d in (parse_source("web=folder:/data/web@0.5"), parse_source("oi=openimages:/d/oi,/d/ids.csv"),
              parse_source("x=tar:s3://b/p.tar")):
        CurateSource.model_validate(d)  # what the recipe schema accepts
    for bad in ("/data/web", "web=/data/web", "web=folder", "=folder:/data/web", "web=folder:", "web:folder=/x"):
        with pytest.raises(typer.BadParameter, match="expected NAME=KIND:PATH") as e:
            parse_source(bad)
        assert repr(bad) in str(e.value) and "--source" in str(e.value)
    with pytest.raises(typer.BadParameter, match="--eval-set"):
        parse_source("nope", option="--eval-set")
    with pytest.raises(typer.BadParameter, match="PATH,IDS_CSV"):
        parse_source("oi=openimages:/d/oi")
