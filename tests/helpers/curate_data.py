"""A constructed image pool with planted duplicates of known kinds, for the `vfm curate` tests.

Everything is drawn here from a seed (no downloads), so the ground truth is exact: which file is a copy of
which original and how it was made, which pairs are different images of one "class" (and so must NOT be
merged), and which files are bad and why.

The originals imitate natural photographs closely enough for perceptual hashes to be meaningful: a smooth
random background (bilinear blend of four corner colours plus low-frequency noise), several large filled
shapes, and a low-amplitude grain. A "class" is a palette + shape family; two images of one class share
both but are independent draws of layout, sizes and gradients, which is the hard negative for near-dup
search (same colours and shapes, different picture).

File names are neutral (`img_0007.jpg`), shuffled across originals and copies, so a stage cannot lean on
names or on the original sorting before its copy.
"""

from __future__ import annotations

import io
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont
from scipy import ndimage

ALL_KINDS: tuple[str, ...] = ("resave", "reencode", "resize", "crop", "watermark", "colour")
# the kinds a pixel/perceptual-hash stage is expected to catch; "crop" is left to the embedding stage
HASH_KINDS: tuple[str, ...] = ("resave", "reencode", "resize", "watermark", "colour")
BAD_REASONS: tuple[str, ...] = ("zero_bytes", "corrupt", "truncated", "too_small", "aspect", "low_entropy",
                                "blurry", "grayscale")

_SHAPE_FAMILIES = ("ellipse", "rect", "poly", "mixed")


@dataclass
class Planted:
    root: Path                                  # the pool folder (images flat at root/<name>)
    originals: list[str]                        # names of the distinct original images
    copies: dict[str, tuple[str, str]]          # planted copy -> (kind, original name)
    distinct_same_class: list[tuple[str, str]]  # different images of one class (must NOT be duplicates)
    bad: dict[str, str]                         # name -> expected rejection reason
    classes: dict[str, int] = field(default_factory=dict)   # original -> class id
    eval_copies: dict[str, tuple[str, str]] = field(default_factory=dict)  # filled by plant_eval_copies
    _counter: list[int] = field(default_factory=lambda: [0], repr=False)

    def _next_name(self, ext: str) -> str:
        self._counter[0] += 1
        return f"img_{self._counter[0]:04d}.{ext}"


@dataclass(frozen=True)
class _Class:
    palette: np.ndarray   # (5, 3) uint8-range floats
    family: str
    n_shapes: tuple[int, int]


def _random_class(rng: np.random.Generator) -> _Class:
    # palettes from HSV so classes differ in hue, with moderate saturation like real scenes
    hues = (rng.uniform(0, 1) + rng.uniform(-0.12, 0.12, 5)) % 1.0
    sats = rng.uniform(0.25, 0.9, 5)
    vals = rng.uniform(0.3, 0.95, 5)
    hsv = (np.stack([hues, sats, vals], 1) * 255).astype(np.uint8).reshape(1, 5, 3)
    palette = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), np.float32).reshape(5, 3)
    lo = int(rng.integers(4, 7))
    return _Class(palette, _SHAPE_FAMILIES[int(rng.integers(len(_SHAPE_FAMILIES)))], (lo, lo + 4))


def _jitter(rng: np.random.Generator, colour: np.ndarray, amount: float = 25.0) -> tuple[int, int, int]:
    c = np.clip(colour + rng.normal(0, amount, 3), 0, 255)
    return tuple(int(v) for v in c)


def _natural(rng: np.random.Generator, cls: _Class, w: int, h: int) -> Image.Image:
    """One photograph-like RGB image of class `cls`."""
    # background: bilinear blend of four jittered palette colours + low-frequency colour noise
    corners = np.stack([np.array(_jitter(rng, cls.palette[int(rng.integers(5))], 40), np.float32)
                        for _ in range(4)]).reshape(2, 2, 3)
    corner_img = Image.fromarray(np.clip(corners, 0, 255).astype(np.uint8), "RGB")
    bg = np.asarray(corner_img.resize((w, h), Image.Resampling.BILINEAR), np.float32)
    lowfreq = rng.normal(0, 18, (5, 5, 3)) + 128
    bg += np.asarray(Image.fromarray(np.clip(lowfreq, 0, 255).astype(np.uint8), "RGB")
                     .resize((w, h), Image.Resampling.BICUBIC), np.float32) - 128
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(img)
    side = min(w, h)
    for _ in range(int(rng.integers(*cls.n_shapes))):
        kind = cls.family if cls.family != "mixed" else ("ellipse", "rect", "poly")[int(rng.integers(3))]
        fill = _jitter(rng, cls.palette[int(rng.integers(5))])
        sw, sh = (rng.uniform(0.12, 0.5, 2) * side).astype(int) + 4
        x0, y0 = int(rng.integers(-sw // 3, w - sw // 2)), int(rng.integers(-sh // 3, h - sh // 2))
        if kind == "ellipse":
            draw.ellipse((x0, y0, x0 + sw, y0 + sh), fill=fill)
        elif kind == "rect":
            draw.rectangle((x0, y0, x0 + sw, y0 + sh), fill=fill)
        else:
            n = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = rng.uniform(0.5, 1.0, n)
            pts = [(float(x0 + sw / 2 + rad[k] * sw / 2 * np.cos(ang[k])),
                    float(y0 + sh / 2 + rad[k] * sh / 2 * np.sin(ang[k]))) for k in range(n)]
            draw.polygon(pts, fill=fill)
    # small clutter: real scenes have detail at every scale, and without it a quality-40 JPEG of a
    # clean synthetic image looks "blurry" to the Laplacian measure
    for _ in range(int(rng.integers(6, 14))):
        fill = _jitter(rng, cls.palette[int(rng.integers(5))], 50)
        r = int(rng.integers(3, max(4, side // 25)))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    # soften the aliased polygon edges a little (camera optics), then add surface texture (band-limited
    # noise at a ~2 px scale, which survives JPEG re-encoding like real texture does) and sensor grain
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)).astype(np.float32), 1.2)
    texture *= 9.0 / max(float(texture.std()), 1e-6)
    arr = (np.asarray(img, np.float32) + texture[..., None] + rng.normal(0, 2.5, (h, w, 1))
           + rng.normal(0, 1.5, (h, w, 3)))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _with_app_segments(jpeg: bytes, rng: np.random.Generator) -> bytes:
    """The same JPEG entropy-coded data with an EXIF (APP1) and a comment segment inserted after SOI.

    This is the "same pixels, other bytes" resave a re-upload through a metadata-editing tool produces.
    The EXIF carries Orientation=6 on purpose: the exact stage hashes pixels as stored, so the copy must
    still collide with its original (see vfm.curate.quality.analyze on EXIF transposition).
    """
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display
    exif[0x010F] = f"Camera{int(rng.integers(1000))}"  # Make
    exif_bytes = exif.tobytes()
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif_bytes) + 2) + exif_bytes
    comment = f"resaved {int(rng.integers(1 << 30))}".encode()
    com = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + app1 + com + jpeg[2:]


def _copy(kind: str, img: Image.Image, data: bytes, ext: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """A planted copy of an original (decoded `img`, stored `data` with extension `ext`) -> (bytes, ext)."""
    w, h = img.size
    if kind == "resave":
        # same decoded pixels, other bytes: a lossless PNG of a JPEG's pixels, the JPEG itself with new
        # metadata segments, or a PNG re-written at another compression level with a text chunk. (A JPEG
        # re-encode at quality 100 changes pixels, so it would not be a resave; that is "reencode".)
        if ext == "png":
            from PIL import PngImagePlugin

            info = PngImagePlugin.PngInfo()
            info.add_text("Comment", f"resaved {int(rng.integers(1 << 30))}")
            return _encode(img, "PNG", compress_level=9, pnginfo=info), "png"
        if rng.uniform() < 0.5:
            return _encode(img, "PNG", compress_level=1), "png"
        return _with_app_segments(data, rng), "jpg"
    if kind == "reencode":
        return _encode(img, "JPEG", quality=int(rng.integers(40, 71))), "jpg"
    if kind == "resize":
        s = float(rng.uniform(0.5, 0.8))
        return _encode(img.resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS), "JPEG", quality=90), "jpg"
    if kind == "crop":
        fx = rng.uniform(0.05, 0.10, 2)
        fy = rng.uniform(0.05, 0.10, 2)
        box = (round(w * fx[0]), round(h * fy[0]), w - round(w * fx[1]), h - round(h * fy[1]))
        return _encode(img.crop(box), "JPEG", quality=90), "jpg"
    if kind == "watermark":
        out = img.copy()
        draw = ImageDraw.Draw(out)
        strip = max(8, round(h * 0.08))
        shade = int(rng.integers(0, 60)) if rng.uniform() < 0.5 else int(rng.integers(200, 256))
        draw.rectangle((0, h - strip, w, h), fill=(shade, shade, shade))
        font = ImageFont.load_default(size=max(8, strip - 6))
        text_fill = (255 - shade,) * 3
        draw.text((6, h - strip + 2), f"(c) stock{int(rng.integers(100, 999))}.example", fill=text_fill, font=font)
        return _encode(out, "JPEG", quality=90), "jpg"
    if kind == "colour":
        arr = np.asarray(img.convert("HSV"), np.int16).copy()
        arr[..., 0] = (arr[..., 0] + int(rng.choice([-1, 1]) * rng.integers(4, 10))) % 256  # ~6-13 degrees
        out = Image.fromarray(arr.astype(np.uint8), "HSV").convert("RGB")
        out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.8, 1.25)))
        out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.85, 1.15)))
        return _encode(out, "JPEG", quality=90), "jpg"
    raise ValueError(f"unknown copy kind {kind!r}; expected one of {ALL_KINDS}")


def _bad_files(rng: np.random.Generator, cls: _Class) -> list[tuple[str, bytes, str]]:
    """(reason, bytes, ext) for each kind of bad input."""
    truncated = _encode(_natural(rng, cls, 320, 240), "JPEG", quality=90)
    near_constant = np.full((240, 320, 3), (120, 131, 140), np.int16) + rng.integers(-1, 2, (240, 320, 1))
    gray = _natural(rng, cls, 320, 240).convert("L")
    return [
        ("zero_bytes", b"", "jpg"),
        ("corrupt", rng.bytes(6000), "jpg"),
        ("truncated", truncated[: len(truncated) // 2], "jpg"),
        ("too_small", _encode(_natural(rng, cls, 40, 40), "JPEG", quality=90), "jpg"),
        # 1000x128 rather than 1000x100: the short side must clear min_side (112) so "aspect" is the first
        # failing check, not "too_small"
        ("aspect", _encode(_natural(rng, cls, 1000, 128), "JPEG", quality=90), "jpg"),
        # PNG so the +-1 noise keeps the file above min_bytes and the first failure is the entropy check
        ("low_entropy", _encode(Image.fromarray(near_constant.astype(np.uint8), "RGB"), "PNG"), "png"),
        ("blurry", _encode(_natural(rng, cls, 320, 320).filter(ImageFilter.GaussianBlur(8)), "JPEG",
                           quality=90), "jpg"),
        ("grayscale", _encode(gray, "JPEG", quality=90), "jpg"),
    ]


def _shuffled_writes(root: Path, pool: Planted, items: list[tuple[str, bytes, str]],
                     rng: np.random.Generator) -> list[str]:
    """Write items (tag, bytes, ext) in a random order under neutral names; returns names in input order."""
    order = rng.permutation(len(items))
    names = [""] * len(items)
    for k in order:
        _, data, ext = items[k]
        name = pool._next_name(ext)
        (root / name).write_bytes(data)
        names[k] = name
    return names


def make_pool(root: Path, *, originals: int = 60, seed: int = 0, kinds=ALL_KINDS, bad: bool = True) -> Planted:
    """Write a pool of `originals` distinct images, copies of about 4/5 of them (one copy each, the kinds
    cycled evenly over `kinds`), and (with `bad`) one file per bad-input reason, flat under `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_classes = max(1, originals // 4)
    classes = [_random_class(rng) for _ in range(n_classes)]
    pool = Planted(root=root, originals=[], copies={}, distinct_same_class=[], bad={})

    # originals: JPEG q90, every 8th a PNG (so the PNG resave path and PNG decoding are exercised)
    orig_imgs: list[tuple[Image.Image, bytes, str, int]] = []
    for i in range(originals):
        c = i % n_classes
        w, h = int(rng.integers(256, 401)), int(rng.integers(256, 401))
        img = _natural(rng, classes[c], w, h)
        if i % 8 == 3:
            data, ext = _encode(img, "PNG"), "png"
        else:
            data, ext = _encode(img, "JPEG", quality=90), "jpg"
            img = Image.open(io.BytesIO(data)).convert("RGB")  # copies start from what a reader decodes
        orig_imgs.append((img, data, ext, c))

    # copies: the first ~4/5 of the originals (in a shuffled order) get one copy, kinds cycled evenly;
    # PNG originals are put first in the order so at least one "resave" starts from a PNG
    kinds = tuple(kinds)
    n_copies = (originals * 4) // 5 if kinds else 0
    pick = list(rng.permutation(originals))
    pick.sort(key=lambda i: orig_imgs[i][2] != "png")
    copy_items: list[tuple[str, bytes, str]] = []
    copy_of: list[tuple[str, int]] = []
    for j, i in enumerate(pick[:n_copies]):
        kind = kinds[j % len(kinds)]
        img, data, ext, _ = orig_imgs[i]
        cdata, cext = _copy(kind, img, data, ext, rng)
        copy_items.append((kind, cdata, cext))
        copy_of.append((kind, i))

    bad_items = _bad_files(rng, classes[0]) if bad else []

    items = [("orig", d, e) for (_, d, e, _) in orig_imgs] + copy_items + bad_items
    names = _shuffled_writes(root, pool, items, rng)
    orig_names = names[:originals]
    pool.originals = orig_names
    pool.classes = {orig_names[i]: orig_imgs[i][3] for i in range(originals)}
    for name, (kind, i) in zip(names[originals:originals + len(copy_items)], copy_of, strict=True):
        pool.copies[name] = (kind, orig_names[i])
    for name, (reason, _, _) in zip(names[originals + len(copy_items):], bad_items, strict=True):
        pool.bad[name] = reason
    by_class: dict[int, list[str]] = {}
    for i, n in enumerate(orig_names):
        by_class.setdefault(orig_imgs[i][3], []).append(n)
    pool.distinct_same_class = [(a, b) for members in by_class.values()
                                for k, a in enumerate(members) for b in members[k + 1:]]
    return pool


def make_eval_set(root: Path, *, images: int = 20, seed: int = 1) -> list[str]:
    """An "IN-1K val"-like flat folder of distinct JPEGs (`ILSVRC2012_val_%08d.JPEG`); returns the names.

    Its classes are drawn from their own seed, so they are unrelated to a pool's images."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(10_000 + seed)
    classes = [_random_class(rng) for _ in range(max(1, images // 2))]
    names = []
    for i in range(images):
        w, h = int(rng.integers(256, 401)), int(rng.integers(256, 401))
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        (root / name).write_bytes(_encode(_natural(rng, classes[i % len(classes)], w, h), "JPEG", quality=90))
        names.append(name)
    return names


def plant_eval_copies(pool: Planted, eval_root: Path, names: list[str],
                      kinds=("resave", "reencode", "resize", "crop", "watermark", "colour")
                      ) -> dict[str, tuple[str, str]]:
    """Put one copy of each named eval image into the pool (kinds cycled); returns copy -> (kind, eval name)
    and records it in `pool.eval_copies` (kept apart from `pool.copies`, whose originals are pool images)."""
    kinds = tuple(kinds)
    # seeded from the names so re-planting the same images gives the same bytes
    rng = np.random.default_rng(random.Random("|".join(names)).getrandbits(63))
    out: dict[str, tuple[str, str]] = {}
    for j, src in enumerate(names):
        data = (Path(eval_root) / src).read_bytes()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        kind = kinds[j % len(kinds)]
        cdata, cext = _copy(kind, img, data, "jpg", rng)
        name = pool._next_name(cext)
        (pool.root / name).write_bytes(cdata)
        out[name] = (kind, src)
    pool.eval_copies.update(out)
    return out
