"""Check every image before it goes into a shard.

Known bad inputs in the ImageNet archives: zero-byte files, gzip-compressed members named .JPEG (fall11;
facebookresearch/dinov2 dinov2/data/datasets/image_net_22k.py `_GZIPPED_INDICES`), a PNG named .JPEG and
22 CMYK JPEGs (IN-1K train; tensorflow/models research/inception/inception/data/build_imagenet_data.py
`_is_png`, `_is_cmyk`), undecodable/truncated files.
Each is classified; by default it is skipped and reported. With `repair=True` the fixable ones are kept:
gzip is unwrapped, a PNG/other format is stored under its true extension (bytes untouched) and a CMYK
JPEG is converted to RGB and re-encoded (the only re-encode vfm ever does). Everything is reported.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass

from PIL import Image

EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
JPEG_NAMES = (".jpeg", ".jpg", ".jpe")


@dataclass(frozen=True)
class Checked:
    data: bytes | None
    """Bytes to store (None: skip the sample)."""
    ext: str = "jpg"
    problem: str | None = None
    """What was wrong, when something was (reported whether repaired or skipped)."""


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        # DCT-domain downscale: still entropy-decodes the whole bitstream (catches truncation) at ~1/8 cost
        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
    img.load()
    return img


def check_image(data: bytes, name: str, repair: bool = False, _depth: int = 0) -> Checked:
    if len(data) == 0:
        return Checked(None, problem="zero-byte image")
    if data[:2] == b"\x1f\x8b":
        problem = "gzip-compressed member"
        if not repair or _depth:
            return Checked(None, problem=problem)
        try:
            inner = check_image(gzip.decompress(data), name, repair, _depth + 1)
        except (OSError, EOFError) as e:
            return Checked(None, problem=f"{problem} (gunzip failed: {e})")
        return Checked(inner.data, inner.ext, problem if inner.problem is None else f"{problem}; {inner.problem}")
    try:
        img = _decode(data)
    except Exception as e:  # PIL raises many types for bad data; every one means "cannot decode"
        return Checked(None, problem=f"undecodable image: {type(e).__name__}: {e}")
    fmt = img.format or "unknown"
    named_jpeg = name.lower().endswith(JPEG_NAMES)
    if fmt != "JPEG" and (named_jpeg or fmt not in EXT_OF_FORMAT):
        problem = f"{fmt} data named {name.rsplit('/', 1)[-1]!r}"
        if not repair:
            return Checked(None, problem=problem)
        if fmt in EXT_OF_FORMAT:
            return Checked(data, EXT_OF_FORMAT[fmt], problem)
        return Checked(_to_rgb_jpeg(data), "jpg", problem)
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        problem = f"{img.mode} JPEG"
        return Checked(_to_rgb_jpeg(data), "jpg", problem) if repair else Checked(None, problem=problem)
    return Checked(data, EXT_OF_FORMAT[fmt])


def _to_rgb_jpeg(data: bytes) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95)
    return out.getvalue()
