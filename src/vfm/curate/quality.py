"""Per-image features and quality checks for `vfm curate`: pure functions of the file's bytes.

`analyze` decodes one image fully and measures what the later stages need: the exact-duplicate key
(`pixel_sha256`), the perceptual hashes (pHash, dHash) for near-duplicate search, and three cheap quality
measures (histogram entropy, variance of the Laplacian, grayscale). `quality_reason` applies thresholds to
those features, so a recipe can change thresholds without decoding again.

Bad input never raises out of `analyze`: it returns a rejection reason string instead, because one
malformed file among a billion must cost one row in the report, not a failed Ray task. (Only caller bugs
raise: a bad hash_size, or PIL's LOAD_TRUNCATED_IMAGES switched on in the process.)
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from vfm.recipes.schema import QualityStage

# Rejection reasons `analyze` can return (quality_reason's are in QUALITY_REASONS).
DECODE_REASONS = ("zero_bytes", "corrupt", "truncated", "unsupported", "too_large")
QUALITY_REASONS = ("too_small", "aspect", "file_size", "low_entropy", "blurry", "grayscale")

# Formats a training loader is expected to read; PIL can open many more (ICO, PCX, EPS via Ghostscript,
# ...) which in a web crawl are almost always icons, scans or tooling artefacts rather than photographs.
# MPO is the multi-picture JPEG that phone cameras write; its first frame is a plain JPEG.
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
               "TIFF": "tiff"}

# Short side of the gray thumbnail the measures are taken on: entropy and Laplacian variance then mean the
# same thing for a 400 px and a 4000 px photo (blur is judged at the scale the image is viewed at).
MEASURE_SIDE = 256
# Short side of the RGB thumbnail the grayscale test looks at, and the largest per-pixel channel spread
# (max - min over R, G, B) on it that still counts as gray: JPEG chroma quantisation of a gray picture
# stored as RGB leaves a few levels of spread, which the thumbnail mostly averages away.
COLOUR_SIDE = 64
GRAYSCALE_TOLERANCE = 6


# one home for the thresholds: the recipe's `curate.quality` fields (vfm.recipes.schema.QualityStage, whose defaults
# were tuned here: see its docstring) are what `quality_reason` reads
QualityThresholds = QualityStage


@dataclass(frozen=True)
class ImageFeatures:
    width: int
    height: int
    bytes: int
    pixel_sha256: str
    entropy: float
    laplacian_var: float
    grayscale: bool
    phash: bytes
    dhash: bytes
    ext: str  # jpg/png/webp/gif/bmp/tiff, from the decoder (not from the file name)


def _decode(data: bytes) -> Image.Image | str:
    """Open and fully decode `data` into an RGB image, or return the rejection reason."""
    if not data:
        return "zero_bytes"
    # PIL's LOAD_TRUNCATED_IMAGES makes load() pad a cut-off file with gray instead of raising; it is a
    # process-wide switch that must stay False, or truncated downloads would pass as images. Another
    # library turning it on is a broken process, not bad input, so this one raises.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; vfm curate needs it "
                           "False to detect truncated files")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if fmt not in _FORMAT_EXT:
            return "unsupported"
        # Image.open only checks w*h > 2 * MAX_IMAGE_PIXELS (raises) and warns above MAX_IMAGE_PIXELS;
        # the warning band would still be decoded, so reject it before load() allocates the pixels.
        if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
            return "too_large"
        img.load()
        if img.mode.startswith("I;16") or img.mode == "I":
            # 16-bit grayscale PNG/TIFF: PIL's convert() clips to 0..255 (a nearly white image); keep the
            # top 8 bits instead, as a viewer would show it
            wide = np.asarray(img).astype(np.int64)
            shift = 8 if wide.max(initial=0) > 255 else 0
            img = Image.fromarray(np.clip(wide >> shift, 0, 255).astype(np.uint8), "L")
        # RGB as the common form: L/P/CMYK/RGBA all convert; alpha is dropped (the trainer's loader
        # also converts to RGB, so two files differing only in alpha are the same training sample).
        rgb = img.convert("RGB")
        rgb.format = fmt  # convert() drops it
        return rgb
    except Image.DecompressionBombError:
        return "too_large"
    except UnidentifiedImageError:
        return "corrupt"
    except OSError as e:
        # PIL's ImageFile.load raises OSError("image file is truncated ...") for JPEG/PNG/WebP streams that
        # end early; other OSErrors are broken streams ("broken data stream", bad PNG CRCs, decoder errors)
        if "truncated" in str(e):
            return "truncated"
        return "corrupt"
    except (SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, KeyError, TypeError):
        # what PIL's format plugins raise on malformed headers/chunks (SyntaxError is their historic "not
        # a valid X file"; EOFError a PNG missing its chunks; struct/zlib errors inside TIFF/PNG parsers)
        return "corrupt"
    except Exception:  # noqa: BLE001
        # Any other exception from a plugin on hostile bytes (fuzzers keep finding new ones) is still one
        # bad file: the contract is that analyze never raises on input data.
        return "corrupt"


def _shrink(img: Image.Image, side: int) -> Image.Image:
    """`img` resized to short side `side`; never upscaled (upsampling would fake blur)."""
    w, h = img.size
    s = side / min(w, h)
    if s >= 1.0:
        return img
    # reducing_gap: PIL first shrinks by an integer factor with a box filter, then resamples; several x
    # faster on large photos and indistinguishable for these measures
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR, reducing_gap=2.0)


def _entropy_bits(gray: np.ndarray) -> float:
    counts = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / gray.size
    return max(0.0, float(-(p * np.log2(p)).sum()))  # max: no -0.0 for a constant image


def _laplacian(gray: np.ndarray) -> np.ndarray:
    """The 4-neighbour Laplacian [[0,1,0],[1,-4,1],[0,1,0]] on interior pixels.

    Same kernel as cv2.Laplacian's default (ksize=1) and scipy.ndimage.laplace; written with slices
    because it is ~5x faster than ndimage.laplace here, and skipping the one-pixel border keeps the
    frame edge from counting as detail."""
    x = gray.astype(np.float32)
    if x.shape[0] < 3 or x.shape[1] < 3:
        return np.zeros(1, np.float32)
    return x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4.0 * x[1:-1, 1:-1]


def _pack_hash(h: imagehash.ImageHash) -> bytes:
    # big-endian within each byte (np.packbits' default): bit k of the row-major hash is the k-th bit
    # from the most significant end; zero-padded to whole bytes when hash_size**2 is not a multiple of 8
    return np.packbits(np.asarray(h.hash, dtype=bool).ravel()).tobytes()


def analyze(data: bytes, name: str, *, hash_size: int = 8) -> ImageFeatures | str:
    """Features of one image file's bytes, or a rejection reason (one of DECODE_REASONS).

    `name` is only for the caller's bookkeeping and error context; the format is detected from content.
    """
    del name  # the format comes from the bytes; names in crawls lie (".jpg" PNGs, ".php" JPEGs)
    if hash_size < 2:
        raise ValueError(f"hash_size must be >= 2, got {hash_size}")  # a caller bug, not bad input
    rgb = _decode(data)
    if isinstance(rgb, str):
        return rgb
    try:
        w, h = rgb.size
        # Exact-duplicate key: sha256 of the decoded RGB pixels plus the size (the size disambiguates
        # equal byte strings of transposed shapes), so a PNG re-save of a JPEG's pixels or the same JPEG
        # with other EXIF collide. No EXIF transpose: two files with the same stored pixels but different
        # Orientation tags are the same training sample for a loader that ignores EXIF, and honouring the
        # tag would make the key depend on metadata a re-upload tool may strip or rewrite; the rotated
        # views are left to the near-duplicate and embedding stages.
        digest = hashlib.sha256(struct.pack(">II", w, h))
        digest.update(rgb.tobytes())
        # gray first, then shrink: PIL resamples RGB as 4 bytes a pixel, so this order is ~3x cheaper
        gray_img = _shrink(rgb.convert("L"), MEASURE_SIDE)
        gray = np.asarray(gray_img)
        # the colour test only needs a small RGB thumbnail; averaging also flattens JPEG chroma noise
        r, g, b = (np.asarray(c) for c in _shrink(rgb, COLOUR_SIDE).split())
        # per-channel maximum/minimum rather than arr.max(axis=2): reducing a length-3 innermost axis
        # is ~30x slower in numpy
        spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
        lap = _laplacian(gray)
        # imagehash converts to L itself; handing it the gray thumbnail skips resizing the full image
        ph = imagehash.phash(gray_img, hash_size=hash_size)
        dh = imagehash.dhash(gray_img, hash_size=hash_size)
        return ImageFeatures(
            width=w, height=h, bytes=len(data), pixel_sha256=digest.hexdigest(),
            entropy=_entropy_bits(gray), laplacian_var=float(lap.var()),
            grayscale=bool(spread.max() <= GRAYSCALE_TOLERANCE),
            phash=_pack_hash(ph), dhash=_pack_hash(dh), ext=_FORMAT_EXT[rgb.format],
        )
    except (ValueError, MemoryError) as e:  # degenerate sizes (e.g. 1x1) in the hashing / measures
        return "corrupt" if isinstance(e, ValueError) else "too_large"


def quality_reason(f: ImageFeatures, t: QualityThresholds) -> str | None:
    """The first failing check in QUALITY_REASONS order, or None when the image passes."""
    if min(f.width, f.height) < t.min_side:
        return "too_small"
    if max(f.width, f.height) / max(1, min(f.width, f.height)) > t.max_aspect:
        return "aspect"
    if f.bytes < t.min_bytes:
        return "file_size"
    if f.entropy < t.min_entropy:
        return "low_entropy"
    if f.laplacian_var < t.min_laplacian_var:
        return "blurry"
    if t.drop_grayscale and f.grayscale:
        return "grayscale"
    return None


def thumbnail(data: bytes, size: int) -> Image.Image:
    """An RGB thumbnail fitting in size x size for the report's grid; a gray placeholder for bad input
    (the report shows rejected files too, so this must not raise either)."""
    rgb = _decode(data)
    if isinstance(rgb, str):
        return Image.new("RGB", (size, size), (128, 128, 128))
    rgb.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)  # keeps the aspect ratio
    return rgb
