"""Index the dense-transfer datasets in their official layouts, in place, like the classification ones (sources.py):
each sample is an image plus its companion, found from headers and the annotation file only, nothing decoded.

  ade20k    ADE20K SceneParsing, `ADEChallengeData2016.zip` (CSAILVision/sceneparsing README):
            ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_<8 digits>.jpg, and beside each image
            ADEChallengeData2016/annotations/<same split>/<same stem>.png, an 8-bit single-channel mask of class ids
            (0 other / ignored, 1..150 the objectInfo150 classes, vfm.data.ade20k_classes). The companion is the mask,
            a second member of the same archive. Other members (objectInfo150.txt, sceneCategories.txt) are not
            samples and are passed over.
  coco2017  COCO 2017 detection: `train2017.zip` / `val2017.zip` (train2017/<12 digits>.jpg) with
            `annotations_trainval2017.zip` (annotations/instances_{train,val}2017.json: `images`, `annotations`,
            `categories`; cocodataset/cocoapi PythonAPI/pycocotools/coco.py `COCO.createIndex` pairs them by
            image_id). The companion is the image's annotation list, stored inline (SourceIndex.payload) as compact
            JSON with the original COCO fields.
Each also accepts the tree already extracted to a directory: ADEChallengeData2016/ (or its parent); a COCO root
holding train2017/ (and annotations/), or the train2017/ folder itself, with --labels the zip, its folder or the
instances json.

Splits: vfm's `--split train|val` (or the official names) select training / validation for ADE20K and
train2017 / val2017 for COCO; the manifest names them `train` / `validation`, as the other layouts do.

Zip members are indexed as tar members are: the index pass lists the central directory, then reads each kept
member's local header (in archive order, as the tar index pass reads each tar header) to learn where its data
starts, and records (data offset, stored size, codec). The shard workers then read every member with the same
`pread` / ranged GET as a tar member and inflate the deflated ones (sources.decode_member, CRC-32 checked). Chosen
over one `zipfile.ZipFile` per worker because it keeps the one read path of every layout (archive-order windows,
S3 ranged reads, no per-worker state or central-directory parse) and handles stored and deflated members alike,
where a stored-only offset would not.

Bad input is skipped and reported, the rest goes on: here (indexing) an image without its mask or a mask without
its image, a COCO annotation whose image_id is not an image, an `images` entry whose file is not in the archive, an
archive image no `images` entry names, zero-byte members, encrypted or unsupported zip members; in the shard writer
(`dense_members`, after validate.check_image) a mask that is not an 8-bit single-channel PNG or not its image's
size, and a COCO image whose header size differs from its `images` entry.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vfm import storage
from vfm.data.ade20k_classes import OBJECT_INFO_150, ade20k_categories
from vfm.data.sources import (
    DEFLATED,
    Members,
    SourceError,
    SourceIndex,
    TruncatedArchiveError,
    _is_hidden,
    open_archive,
    walk_dir,
)
from vfm.data.validate import check_label_mask, image_size

ADE_RELEASE = "ADEChallengeData2016"
# vfm split name -> the release's own folder name; the official names are accepted as well
OFFICIAL_SPLITS = {"ade20k": {"train": "training", "validation": "validation"},
                   "coco2017": {"train": "train2017", "validation": "val2017"}}
TASKS = {"ade20k": "semantic_segmentation", "coco2017": "object_detection"}


def dense_split(dataset: str, split: str | None) -> tuple[str, str]:
    """(vfm split name, the release's folder name) of `split`: train / val / validation or the official name."""
    splits = OFFICIAL_SPLITS[dataset]
    wanted = {"val": "validation"}.get(split or "", split or "")
    for vfm_name, official in splits.items():
        if wanted in (vfm_name, official):
            return vfm_name, official
    raise SourceError(f"{dataset} needs --split train or val (or the release's own names "
                      f"{' / '.join(splits.values())}); got {split!r}")


def index_dense(dataset: str, source: str, *, split: str | None, labels: str | None = None,
                progress: Callable[[str], None] = lambda _msg: None, drop_unannotated: bool = False) -> SourceIndex:
    """Index `source` in the layout `dataset` ("ade20k" or "coco2017"), one split of it."""
    _, official = dense_split(dataset, split)
    if not (storage.exists(source) if storage.is_s3(source) else os.path.exists(source)):
        raise SourceError(f"--source {source} does not exist")
    if dataset == "ade20k":
        if labels:
            raise SourceError("ade20k takes no --labels: its masks are in the same archive as its images")
        return _index_ade20k(source, official, progress)
    return _index_coco(source, official, labels, progress, drop_unannotated)


# ---------------------------------------------------------------------------------------------------
# Members of a zip or a folder: name -> (file id, data offset, stored size, codec, size)

_Member = tuple[int, int, int, int, int]
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. sizes), name length, extra length
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}


def _is_zip(path: str) -> bool:
    return path.endswith(".zip") or (not storage.is_s3(path) and os.path.isfile(path) and zipfile.is_zipfile(path))


def zip_members(path: str, index: SourceIndex, keep: Callable[[str], bool],
                rename: Callable[[str], str] = lambda n: n) -> dict[str, _Member]:
    """The kept regular members of the zip at `path` (renamed by `rename`), each located at its data: the central
    directory lists them, and each local header (name and extra lengths may differ from the central record's, so it
    is read, not assumed) gives where the data starts. Encrypted members and compression methods other than stored
    and deflated are reported and left out."""
    fid = index.add_file(path)
    out: dict[str, _Member] = {}
    size = storage.object_size(path)
    with open_archive(path) as f:
        try:
            infos = zipfile.ZipFile(f).infolist()
        except zipfile.BadZipFile as e:
            raise TruncatedArchiveError(path, size, size, f"no readable zip central directory ({e}); the end of "
                                        "the file, where a zip keeps its directory, is missing or damaged") from e
        kept = sorted((i for i in infos if not i.is_dir() and keep(i.filename) and not _is_hidden(i.filename)),
                      key=lambda i: i.header_offset)
        for info in kept:
            name = rename(info.filename)
            if info.flag_bits & 0x1:
                index.fail(name, path, "encrypted zip member; vfm reads unencrypted archives only")
                continue
            if info.compress_type not in _METHODS:
                index.fail(name, path, f"zip compression method {info.compress_type} is not stored or deflated; "
                                       "re-zip the tree with `zip -r` (deflate) or extract it and pass the folder")
                continue
            f.seek(info.header_offset)
            header = f.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise TruncatedArchiveError(path, info.header_offset, size,
                                            f"no local header for member {info.filename!r} where the directory says")
            _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            data = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            if data + info.compress_size > size:
                raise TruncatedArchiveError(path, data, size, f"member {info.filename!r} is cut short")
            codec = DEFLATED | info.CRC if info.compress_type == zipfile.ZIP_DEFLATED else 0
            out[name] = (fid, data, info.compress_size, codec, info.file_size)
    return out


def folder_members(root: str, under: str, fid: int) -> dict[str, _Member]:
    """The files below `root`/`under` as members named by their path relative to `root`, read as files of the
    folder source `fid` (= `root`)."""
    out: dict[str, _Member] = {}
    if not os.path.isdir(os.path.join(root, under)):
        return out
    for name, _, size in walk_dir(os.path.join(root, under)):
        if not _is_hidden(name):
            out[f"{under}/{name}"] = (fid, 0, size, 0, size)
    return out


def _stem_of(name: str, folder: str, ext: str) -> str | None:
    """`x` for `<folder>/x<ext>` (no deeper folders), else None."""
    rest = name[len(folder) + 1:] if name.startswith(folder + "/") else None
    if rest is None or "/" in rest or not rest.lower().endswith(ext):
        return None
    return rest[: -len(ext)]


# ---------------------------------------------------------------------------------------------------
# ADE20K


def _ade_root(source: str) -> str:
    for root in (os.path.join(source, ADE_RELEASE), source):
        if os.path.isdir(os.path.join(root, "images")) and os.path.isdir(os.path.join(root, "annotations")):
            return root
    raise SourceError(f"{source}: not an extracted {ADE_RELEASE} (expected {ADE_RELEASE}/images/ and "
                      f"{ADE_RELEASE}/annotations/ in it, or images/ and annotations/ directly)")


def _index_ade20k(source: str, official: str, progress: Callable[[str], None]) -> SourceIndex:
    index = SourceIndex(dataset="ade20k", classes=list(OBJECT_INFO_150), task="semantic_segmentation",
                        categories=ade20k_categories(), companions=Members())
    image_dir, mask_dir = f"images/{official}", f"annotations/{official}"
    progress(os.path.basename(source.rstrip("/")))
    if os.path.isdir(source):
        root = _ade_root(source)
        fid = index.add_file(root)
        members = {**folder_members(root, image_dir, fid), **folder_members(root, mask_dir, fid)}
        where = root
    elif _is_zip(source):
        # names relative to the release folder, as in the extracted tree, so both give the same sample keys
        members = zip_members(source, index, keep=lambda n: n.removeprefix(f"{ADE_RELEASE}/").startswith(
            (image_dir + "/", mask_dir + "/")), rename=lambda n: n.removeprefix(f"{ADE_RELEASE}/"))
        where = source
    else:
        raise SourceError(f"--source {source}: ade20k reads {ADE_RELEASE}.zip or that zip extracted to a folder")
    images: dict[str, str] = {}
    masks: dict[str, str] = {}
    for name in members:
        image_stem, mask_stem = _stem_of(name, image_dir, ".jpg"), _stem_of(name, mask_dir, ".png")
        if image_stem is not None:
            images[image_stem] = name
        elif mask_stem is not None:
            masks[mask_stem] = name
        else:
            index.fail(name, where, f"not a {image_dir}/*.jpg image or {mask_dir}/*.png mask of the {ADE_RELEASE} "
                                    "layout")
    if not images:
        raise SourceError(f"{source}: no {ADE_RELEASE}/{image_dir}/*.jpg images; is it {ADE_RELEASE}.zip (the "
                          "SceneParsing release) and the right --split?")
    for stem in sorted(images.keys() | masks.keys()):
        image, mask = images.get(stem), masks.get(stem)
        if mask is None:
            index.fail(image, where, f"image without its mask: no {mask_dir}/{stem}.png")
        elif image is None:
            index.fail(mask, where, f"mask without its image: no {image_dir}/{stem}.jpg")
        elif members[image][4] == 0:
            index.fail(image, where, "zero-byte image")
        elif members[mask][4] == 0:
            index.fail(image, where, f"zero-byte mask {mask}")
        else:
            fid, offset, size, codec, _ = members[image]
            mfid, moffset, msize, mcodec, _ = members[mask]
            index.add_dense(fid, offset, size, image, codec=codec, companion=(mfid, moffset, msize, mask, mcodec))
    return index


# ---------------------------------------------------------------------------------------------------
# COCO 2017


def _coco_images_source(source: str, official: str, index: SourceIndex) -> tuple[dict[str, _Member], str | None]:
    """The archive's `<split>/...` members, and the folder the annotations may sit beside (an extracted root)."""
    if _is_zip(source):
        return zip_members(source, index, keep=lambda n: n.startswith(f"{official}/")), None
    if not os.path.isdir(source):
        raise SourceError(f"--source {source}: coco2017 reads {official}.zip or the extracted {official}/ folder")
    root = source
    if not os.path.isdir(os.path.join(root, official)):
        if os.path.basename(os.path.abspath(source)) != official:
            raise SourceError(f"--source {source}: no {official}/ folder in it (a COCO root holds {official}/ and "
                              f"annotations/); pass {official}.zip, the root or the {official}/ folder itself")
        root = os.path.dirname(os.path.abspath(source))
    return folder_members(root, official, index.add_file(root)), root


def _load_instances(labels: str | None, root: str | None, official: str) -> tuple[dict[str, Any], str]:
    """instances_<split>.json from --labels (annotations_trainval2017.zip, its extracted folder or the json
    itself), or from an extracted COCO root's annotations/ when --labels is not given; and where it was read."""
    member = f"annotations/instances_{official}.json"
    if labels is None:
        if root is None or not os.path.isfile(os.path.join(root, member)):
            raise SourceError(f"coco2017 needs --labels annotations_trainval2017.zip (or {member}); the image "
                              "archive holds no annotations")
        labels = os.path.join(root, member)
    if not (storage.exists(labels) if storage.is_s3(labels) else os.path.exists(labels)):
        raise SourceError(f"--labels {labels} does not exist")
    if os.path.isdir(labels):
        for candidate in (os.path.join(labels, member), os.path.join(labels, os.path.basename(member))):
            if os.path.isfile(candidate):
                return _parse_instances(Path(candidate).read_bytes(), candidate), candidate
        raise SourceError(f"--labels {labels}: no {member} in the folder")
    if labels.endswith(".json"):
        return _parse_instances(storage.read_bytes(labels) if storage.is_s3(labels) else Path(labels).read_bytes(),
                                labels), labels
    with open_archive(labels) as f:
        try:
            zf = zipfile.ZipFile(f)
            data = zf.read(member)
        except KeyError:
            raise SourceError(f"--labels {labels}: the zip has no {member} (is it annotations_trainval2017.zip?)"
                              ) from None
        except zipfile.BadZipFile as e:
            raise SourceError(f"--labels {labels}: not a readable zip ({e}); pass annotations_trainval2017.zip "
                              "or the instances json") from e
    return _parse_instances(data, f"{labels}:{member}"), f"{labels}:{member}"


def _parse_instances(data: bytes, where: str) -> dict[str, Any]:
    try:
        d = json.loads(data)
    except ValueError as e:
        raise SourceError(f"{where}: not valid JSON ({e}); re-download annotations_trainval2017.zip") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(d.get(k) if isinstance(d, dict)
                                                                                   else None, list)]
    if missing:
        raise SourceError(f"{where}: no {', '.join(missing)} list; a COCO instances file has images, annotations "
                          "and categories")
    return d


def _index_coco(source: str, official: str, labels: str | None, progress: Callable[[str], None],
                drop_unannotated: bool) -> SourceIndex:
    index = SourceIndex(dataset="coco2017", classes=[], task="object_detection")
    progress(os.path.basename(source.rstrip("/")))
    members, root = _coco_images_source(source, official, index)
    progress(f"instances_{official}.json")
    d, labels_at = _load_instances(labels, root, official)
    categories = sorted(d["categories"], key=lambda c: c.get("id", -1))
    ids = [c.get("id") for c in categories]
    if any(not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str) for c in categories) \
            or len(set(ids)) != len(ids):
        raise SourceError(f"{labels_at}: `categories` needs a unique integer id and a name in every entry")
    index.categories = categories
    index.classes = [c["name"] for c in categories]
    where = source
    by_id: dict[int, dict[str, Any]] = {}
    for n, img in enumerate(d["images"]):
        if not isinstance(img, dict) or not all(isinstance(img.get(k), t) for k, t in
                                                 (("id", int), ("file_name", str), ("width", int), ("height", int))):
            index.fail(f"images[{n}]", labels_at, "`images` entry lacks an integer id, width, height or a file_name",
                       key=f"image/{n}")
        elif img["id"] in by_id:
            index.fail(f"{official}/{img['file_name']}", labels_at, f"image id {img['id']} listed twice in `images`")
        else:
            by_id[img["id"]] = img
    anns: dict[int, list[dict[str, Any]]] = {}
    for ann in d["annotations"]:
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id in by_id:
            anns.setdefault(image_id, []).append(ann)
        else:
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            index.fail(f"annotation {ann_id}", labels_at, f"annotation {ann_id}: image_id {image_id} is not in "
                                                          "`images`", key=f"annotation/{ann_id}")
    del d
    listed: set[str] = set()
    for img in sorted(by_id.values(), key=lambda i: i["file_name"]):
        name = f"{official}/{img['file_name']}"
        listed.add(name)
        if name not in members:
            index.fail(name, labels_at, f"listed in `images` (id {img['id']}) but {source} has no {name}")
            continue
        if members[name][4] == 0:
            index.fail(name, where, "zero-byte image")
            continue
        # kept by default, for val (they count in COCO AP: cocoapi PythonAPI/pycocotools/cocoeval.py evaluates every
        # image id) and for train; facebookresearch/detectron2 drops them for training by default
        # (detectron2/config/defaults.py DATALOADER.FILTER_EMPTY_ANNOTATIONS = True, applied in
        # detectron2/data/build.py `filter_images_with_only_crowd_annotations`, which also drops crowd-only images)
        if drop_unannotated and img["id"] not in anns:
            index.fail(name, labels_at, "no annotations (left out: --drop-unannotated)", action="filtered")
            continue
        record = {"image_id": img["id"], "file_name": img["file_name"], "width": img["width"],
                  "height": img["height"], "annotations": anns.get(img["id"], [])}
        fid, offset, size, codec, _ = members[name]
        index.add_dense(fid, offset, size, name, codec=codec,
                        payload=json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(members.keys() - listed):
        index.fail(name, where, f"not in the `images` of {labels_at}: no annotations to pair it with")
    if not len(index):
        raise SourceError(f"{source}: no image of {labels_at} found in it; is it {official}.zip (and --labels the "
                          "same split's annotations)?")
    return index


# ---------------------------------------------------------------------------------------------------
# Shard members


def dense_members(index: SourceIndex, i: int, image: bytes, ext: str, companion: bytes | None,
                  verify: str = "header") -> dict[str, bytes] | str:
    """The shard members of dense sample i, its image already through validate.check_image (`ext` its true
    extension): segmentation `<ext>` + `seg.png` (the mask's bytes as they are) + `json` (name, mask, source, width,
    height); detection `<ext>` + `json` (image_id, file_name, width, height, annotations). A string instead is why
    the sample is skipped."""
    try:
        width, height = image_size(image)
    except Exception as e:  # PIL raises many types for a header it cannot parse; every one means "no size"
        return f"image size unreadable from its header: {type(e).__name__}: {e}"
    if index.task == "semantic_segmentation":
        mask_name = index.companions.name(i)
        if companion is None:
            return f"no mask for this image in the index (expected {mask_name or 'one'})"
        problem = check_label_mask(companion, mask_name, (width, height), verify)
        if problem:
            return problem
        # "source" is the release, not the path it was read from: a zip and its extracted tree give the same bytes
        info = {"name": index.name(i), "mask": mask_name, "source": ADE_RELEASE, "width": width, "height": height}
        return {ext: image, "seg.png": companion, "json": json.dumps(info, sort_keys=True).encode()}
    if index.task == "object_detection":
        payload = index.payload(i)
        record = json.loads(payload)
        if (record["width"], record["height"]) != (width, height):
            return (f"image is {width}x{height} but its `images` entry (id {record['image_id']}) says "
                    f"{record['width']}x{record['height']}: its boxes would not fit it")
        return {ext: image, "json": payload}
    raise ValueError(f"{index.dataset}: no dense members for task {index.task!r}")
