"""The two depths of the per-image check: "header" (the sharder's default) never decodes, "decode" does."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vfm.data.synthetic import jpeg_bytes, synthetic_image
from vfm.data.validate import check_image


@pytest.fixture
def jpeg() -> bytes:
    return jpeg_bytes(synthetic_image(0, 4, 48, np.random.default_rng(0)))


def test_header_mode_keeps_good_images_without_decoding_them(jpeg, monkeypatch):
    def no_decode(self, *a, **k):
        raise AssertionError("header mode decoded the image")
    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    checked = check_image(jpeg, "n01440764_1.JPEG")
    assert checked.data == jpeg and checked.problem is None and checked.ext == "jpg"
    # bytes after the end-of-image marker (padding) are not truncation
    assert check_image(jpeg + b"\0" * 100, "n01440764_1.JPEG").problem is None
    decoded = check_image(jpeg, "n01440764_1.JPEG", verify="decode")  # the probe's error, classified
    assert decoded.data is None and "header mode decoded the image" in decoded.problem


@pytest.mark.parametrize("verify", ["header", "decode"])
def test_both_modes_catch_the_archive_defects(jpeg, verify):
    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8)).save(cmyk, format="JPEG")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    cases = {
        "zero-byte image": b"",
        "undecodable image": jpeg[: len(jpeg) // 2],  # truncated: no end-of-image marker
        "CMYK JPEG": cmyk.getvalue(),
        "PNG data named": png.getvalue(),
    }
    for reason, data in cases.items():
        checked = check_image(data, "n01440764_2.JPEG", verify=verify)
        assert checked.data is None and checked.problem.startswith(reason), (reason, checked.problem)


@pytest.mark.parametrize(("mode", "save"), [("RGB", {}), ("L", {}), ("CMYK", {}), ("RGB", {"progressive": True}),
                                            ("RGB", {"exif": b"Exif\0\0" + b"\0" * 64, "subsampling": 0})])
def test_jpeg_frame_parse_agrees_with_pil(mode, save):
    from vfm.data.validate import _jpeg_frame

    buf = io.BytesIO()
    Image.new(mode, (37, 23)).save(buf, format="JPEG", **save)
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert _jpeg_frame(buf.getvalue()) == (img.mode, img.width, img.height)
