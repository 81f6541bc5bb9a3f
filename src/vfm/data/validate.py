"""Check every image before it goes into a shard.

Known bad inputs in the ImageNet archives: zero-byte files, gzip-compressed members named .JPEG (fall11;
facebookresearch/dinov2 dinov2/data/datasets/image_net_22k.py `_GZIPPED_INDICES`), a PNG named .JPEG and
22 CMYK JPEGs (IN-1K train; tensorflow/models research/inception/inception/data/build_imagenet_data.py
`_is_png`, `_is_cmyk`), undecodable/truncated files.
Two depths (`verify`): "header" (the default) checks what catches those cases without decoding: the bytes are
not empty or gzip, a JPEG starts with its SOI marker and ends with EOI (truncation), and PIL's header parse gives
the format, the mode (CMYK) and the size. "decode" also entropy-decodes every image (PIL's DCT-domain draft, about
1/8 of a full decode), which catches corrupt scan data inside a complete file at several times the cost.
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
VERIFY_MODES = ("header", "decode")
# a JPEG's EOI marker may be followed by padding or an appended thumbnail's bytes: look for it near the end
EOI_WINDOW = 4096


@dataclass(frozen=True)
class Checked:
    data: bytes | None
    """Bytes to store (None: skip the sample)."""
    ext: str = "jpg"
    problem: str | None = None
    """What was wrong, when something was (reported whether repaired or skipped)."""


_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}  # by the frame's component count, as PIL names them
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_frame(data: bytes) -> tuple[str, int, int] | None:
    """(mode, width, height) from a JPEG's start-of-frame segment, walking the marker segments before it.
    Own code rather than PIL's `Image.open` (about 100 µs an image, the header check's whole cost) because
    only SOFn is needed; None when the markers do not parse, and PIL then decides."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # segments without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF:
            if pos + 10 > end:
                return None
            height, width = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
            mode = _JPEG_MODES.get(data[pos + 9], f"{data[pos + 9]}-component")
            return (mode, width, height) if width and height else None
        pos += 2 + length
    return None


def _format_and_mode(data: bytes, verify: str) -> tuple[str, str]:
    if data[:2] == b"\xff\xd8":
        if b"\xff\xd9" not in data[-EOI_WINDOW:]:
            raise ValueError("JPEG without its end-of-image marker (truncated)")
        frame = _jpeg_frame(data) if verify == "header" else None
        if frame is not None:
            return "JPEG", frame[0]
    img = Image.open(io.BytesIO(data))  # parses the header only
    if verify == "decode":
        if img.format == "JPEG":
            # DCT-domain downscale: still entropy-decodes the whole bitstream (catches truncation) at ~1/8 cost
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    return img.format or "unknown", img.mode


def check_image(data: bytes, name: str, repair: bool = False, verify: str = "header", _depth: int = 0) -> Checked:
    if len(data) == 0:
        return Checked(None, problem="zero-byte image")
    if data[:2] == b"\x1f\x8b":
        problem = "gzip-compressed member"
        if not repair or _depth:
            return Checked(None, problem=problem)
        try:
            inner = check_image(gzip.decompress(data), name, repair, verify, _depth + 1)
        except (OSError, EOFError) as e:
            return Checked(None, problem=f"{problem} (gunzip failed: {e})")
        return Checked(inner.data, inner.ext, problem if inner.problem is None else f"{problem}; {inner.problem}")
    try:
        fmt, mode = _format_and_mode(data, verify)
    except Exception as e:  # PIL raises many types for bad data; every one means "cannot decode"
        return Checked(None, problem=f"undecodable image: {type(e).__name__}: {e}")
    named_jpeg = name.lower().endswith(JPEG_NAMES)
    if fmt != "JPEG" and (named_jpeg or fmt not in EXT_OF_FORMAT):
        problem = f"{fmt} data named {name.rsplit('/', 1)[-1]!r}"
        if not repair:
            return Checked(None, problem=problem)
        if fmt in EXT_OF_FORMAT:
            return Checked(data, EXT_OF_FORMAT[fmt], problem)
        return Checked(_to_rgb_jpeg(data), "jpg", problem)
    if fmt == "JPEG" and mode not in ("RGB", "L"):
        problem = f"{mode} JPEG"
        return Checked(_to_rgb_jpeg(data), "jpg", problem) if repair else Checked(None, problem=problem)
    return Checked(data, EXT_OF_FORMAT[fmt])


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding: the JPEG frame walk above, else PIL's header
    parse. Called on bytes `check_image` accepted."""
    frame = _jpeg_frame(data) if data[:2] == b"\xff\xd8" else None
    if frame is not None:
        return frame[1], frame[2]
    return Image.open(io.BytesIO(data)).size


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the closing chunk: length 0, type, CRC-32


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    color_type: int


def png_header(data: bytes) -> PngHeader | None:
    """The IHDR fields of a PNG (the first chunk, right after the signature: PNG spec 11.2.2), or None when
    `data` does not start like a PNG."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 29:
        return None
    return PngHeader(int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), data[24], data[25])


def check_label_mask(data: bytes, name: str, image_wh: tuple[int, int], verify: str = "header") -> str | None:
    """What is wrong with a segmentation mask for an image of `image_wh`, or None: it must be a complete PNG,
    8-bit single-channel (one class id per pixel, as ADE20K's annotations/*.png; open-mmlab/mmsegmentation
    mmseg/datasets/ade.py reads them unchanged) and exactly the image's size. From the header, without decoding;
    `verify="decode"` also decodes it."""
    header = png_header(data)
    if header is None:
        return f"mask {name} is not a PNG"
    if not data.endswith(PNG_IEND):
        return f"mask {name} has no PNG end chunk (truncated)"
    if (header.bit_depth, header.color_type) != (8, 0):
        kind = PNG_COLOR_TYPES.get(header.color_type, f"color type {header.color_type}")
        return f"mask {name} is a {header.bit_depth}-bit {kind} PNG, not 8-bit single-channel (grayscale)"
    if (header.width, header.height) != image_wh:
        return (f"mask {name} is {header.width}x{header.height} but its image is {image_wh[0]}x{image_wh[1]}: "
                "they must be the same size")
    if verify == "decode":
        try:
            Image.open(io.BytesIO(data)).load()
        except Exception as e:  # PIL raises many types for bad data; every one means "cannot decode"
            return f"mask {name} does not decode: {type(e).__name__}: {e}"
    return None


def _to_rgb_jpeg(data: bytes) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95)
    return out.getvalue()
