"""The inputs of `vfm curate`: each recipe source (`curate.sources`, `curate.decontaminate.sets`) indexed in place as a
`SourceIndex` (vfm.data.sources: where every image's bytes are, headers only, nothing extracted), so Ray tasks read
each part's images by offset as `vfm shard`'s workers do.

Kinds (vfm.recipes.schema.CurateSource):
  folder      image files under a directory or an `s3://` prefix, any depth; a tar met there is read as `tar`
  tar         a tar of images, or a directory of tars (any layout inside: ImageNet-R's, IN-1K val's flat one)
  wds         WebDataset shards of `vfm shard` / `vfm curate`: the image member of each sample, through the manifest
  in22k       the official fall11_whole.tar (tar of per-wnid tars; .tar.gz, s3:// or extracted too): `<wnid>/<image>`
  openimages  a folder of `<ImageID>.jpg` and the release's image-id CSV (`ImageID` column): the listed images only,
              a listed image that is missing is reported
Entry names are `<path inside the source>`; an image's identity in the run is (source, entry).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from vfm import storage
from vfm.data.sources import SourceError, SourceIndex, gunzip_to_spool, walk_dir, walk_tar, walk_tar_of_tars

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def resolve(path: str, raw_root: str) -> str:
    """A source path as the recipe gives it: absolute or `s3://` as is, else under the raw-data volume."""
    if storage.is_s3(path) or os.path.isabs(path) or not raw_root:
        return path
    return storage.join(raw_root, path)


def _is_hidden(name: str) -> bool:
    """A dot file or anything under a dot folder (`.DS_Store`, macOS `._x.jpg` / `._x.tar` resource forks, `.git/`)."""
    return any(p.startswith(".") for p in name.split("/"))


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTS and not _is_hidden(name)


def _is_tar(name: str) -> bool:
    return name.endswith(".tar") and not _is_hidden(name)


def _is_sample_image(name: str) -> bool:
    """The image member of a WebDataset sample: `<key>.<ext>` with an image extension and nothing between key and
    extension (WebDataset splits the key at the basename's first dot), so `<key>.seg.png`, a mask, is not one."""
    base = name.rsplit("/", 1)[-1]
    _, dot, ext = base.partition(".")
    return bool(dot) and f".{ext.lower()}" in IMAGE_EXTS and not _is_hidden(name)


def _add(index: SourceIndex, fid: int, offset: int, size: int, name: str, src: str) -> None:
    if size == 0:
        index.fail(name, src, "zero_bytes")
    else:
        index.add(fid, offset, size, 0, name)


def _add_tar(index: SourceIndex, path: str, prefix: str = "") -> None:
    fid = index.add_file(path)
    for name, offset, size in walk_tar(path):
        if _is_image(name):
            _add(index, fid, offset, size, prefix + name, path)


def _index_folder(index: SourceIndex, root: str, progress: Callable[[str], None]) -> None:
    if storage.is_s3(root):
        base = root.rstrip("/") + "/"
        for url, size in storage.list_sizes(root):
            rel = url[len(base):]
            if _is_tar(rel):
                progress(rel)
                _add_tar(index, url, rel.removesuffix(".tar") + "/")
            elif _is_image(rel):  # one object per image: its own "file" in the index, read whole
                _add(index, index.add_file(url), 0, size, rel, url)
        return
    if not os.path.isdir(root):
        raise SourceError(f"curate source {root}: not a directory (kind folder reads image files under a directory "
                          "or an s3:// prefix)")
    fid = index.add_file(root)
    for rel, _, size in walk_dir(root):
        if _is_tar(rel):
            progress(rel)
            _add_tar(index, os.path.join(root, rel), rel.removesuffix(".tar") + "/")
        elif _is_image(rel):
            _add(index, fid, 0, size, rel, root)


def _index_tars(index: SourceIndex, path: str, progress: Callable[[str], None]) -> None:
    """A tar (entries: its members), or the tars under a directory / prefix at any depth (entries:
    `<the tar's path there, less .tar>/<member>`, so two `part.tar` in two folders stay apart)."""
    if storage.is_s3(path):
        base = path.rstrip("/") + "/"
        if path.endswith(".tar") and storage.exists(path):
            tars = [(path, PurePosixPath(path).name)]  # the tar named, read as one whatever its name
        else:
            tars = [(u, u[len(base):]) for u in storage.list_prefix(path) if _is_tar(u[len(base):])]
    elif os.path.isfile(path):
        tars = [(path, os.path.basename(path))]
    elif os.path.isdir(path):
        listed = ((p, os.path.relpath(p, path).replace(os.sep, "/")) for p in storage.list_prefix(path))
        tars = [(p, rel) for p, rel in listed if _is_tar(rel)]
    else:
        raise SourceError(f"curate source {path}: no such file or directory (kind tar reads a tar or a directory "
                          "of tars)")
    if not tars:
        raise SourceError(f"curate source {path}: no .tar files there (kind tar reads a tar or a directory of tars)")
    for url, rel in tars:
        progress(rel)
        _add_tar(index, url, "" if len(tars) == 1 else rel.removesuffix(".tar") + "/")


def _index_wds(index: SourceIndex, path: str, progress: Callable[[str], None]) -> None:
    from vfm.data.manifest import Manifest

    try:
        manifest = Manifest.load(path)
    except FileNotFoundError as e:  # Manifest.load's own message says what is missing
        raise SourceError(f"curate source {path} (kind wds): {e}") from None
    except ValueError as e:  # not JSON, or not a vfm manifest
        raise SourceError(f"curate source {path} (kind wds): not a manifest of `vfm shard` / `vfm curate`: {e}") from None
    for i, shard in enumerate(manifest.shards):
        url = manifest.shard_url(i)
        progress(shard.name)
        fid = index.add_file(url)
        for name, offset, size in walk_tar(url):
            if _is_sample_image(name):  # the image member of each sample; .cls / .json / masks are not images to curate
                _add(index, fid, offset, size, f"{PurePosixPath(shard.name).stem}/{name}", url)


def _index_in22k(index: SourceIndex, path: str, progress: Callable[[str], None]) -> None:
    """fall11_whole.tar (local, `.tar.gz` spooled once as `vfm shard` does, or `s3://`): entries `<wnid>/<image>`;
    an unreadable per-wnid tar is reported by walk_tar_of_tars and the rest read. An extracted copy (a directory
    of `<wnid>/` folders or `<wnid>.tar` files) reads as a folder, to the same names. The wnids are not checked
    against the fall11 synset list: the images are unlabelled here, the wnid is only part of the name."""
    if os.path.isdir(path):
        _index_folder(index, path, progress)
        return
    if not (storage.exists(path) if storage.is_s3(path) else os.path.isfile(path)):
        raise SourceError(f"curate source {path}: no such file (kind in22k reads the official fall11_whole.tar, "
                          "a tar of per-wnid tars)")
    tar = gunzip_to_spool(path, None, lambda _n: None) if path.endswith(".gz") else path
    fid = index.add_file(tar)
    for name, offset, size in walk_tar_of_tars(tar, index, progress):
        if _is_image(name):
            _add(index, fid, offset, size, name, path)


def _index_openimages(index: SourceIndex, root: str, ids_csv: str, progress: Callable[[str], None]) -> None:
    if not storage.exists(ids_csv):
        raise SourceError(f"curate source {root}: its image-id CSV {ids_csv} does not exist (give the Open Images "
                          "image-id CSV of the release, e.g. train-images-boxable-with-rotation.csv)")
    text = storage.read_bytes(ids_csv).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    if "ImageID" not in (reader.fieldnames or []):
        raise SourceError(f"{ids_csv}: no ImageID column (columns: {reader.fieldnames}); give the Open Images "
                          "image-id CSV of the release, e.g. train-images-boxable-with-rotation.csv")
    listed = sorted({row["ImageID"] for row in reader if row.get("ImageID")})
    progress(f"{len(listed):,} image ids in {os.path.basename(ids_csv)}")
    if storage.is_s3(root):
        base = root.rstrip("/") + "/"
        sizes = {url[len(base):]: size for url, size in storage.list_sizes(root)}
    else:
        if not os.path.isdir(root):
            raise SourceError(f"curate source {root}: not a directory of <ImageID>.jpg files")
        sizes = {rel: size for rel, _, size in walk_dir(root)}
    fid = index.add_file(root)
    for image_id in listed:
        name = f"{image_id}.jpg"
        if name not in sizes:
            index.fail(name, root, "missing: listed in the id CSV, no file")
        elif storage.is_s3(root):
            _add(index, index.add_file(storage.join(root, name)), 0, sizes[name], name, root)
        else:
            _add(index, fid, 0, sizes[name], name, root)


def index_curate_source(source: Any, raw_root: str = "", progress: Callable[[str], None] = lambda _m: None) -> SourceIndex:
    """Index one `CurateSource` (unlabelled: label 0 everywhere; IN-22K keeps its wnid in the entry name)."""
    path = resolve(source.path, raw_root)
    index = SourceIndex(dataset=source.name, classes=[])
    if source.kind == "in22k":
        _index_in22k(index, path, progress)
    elif source.kind == "folder":
        _index_folder(index, path, progress)
    elif source.kind == "tar":
        _index_tars(index, path, progress)
    elif source.kind == "wds":
        _index_wds(index, path, progress)
    elif source.kind == "openimages":
        _index_openimages(index, path, resolve(source.ids_csv, raw_root), progress)
    else:  # the schema admits no other kind
        raise SourceError(f"curate source {source.name}: unknown kind {source.kind!r}")
    if not len(index) and not index.failures:
        raise SourceError(f"curate source {source.name} ({source.kind} {path}): no images found there; check the path "
                          f"(image extensions read: {', '.join(sorted(IMAGE_EXTS))})")
    return index
