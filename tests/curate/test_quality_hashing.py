"""vfm.curate.quality and vfm.curate.hashing on the planted pool of tests.helpers.curate_data.

The dedup test prints the measured recall per kind and the precision (run with -s to see them, or read the
`-rA` summary): the exact stage (pixel_sha256) and the perceptual stage (pHash or dHash within their
default radii, via multi-index hashing) together must find >= 95 % of the copies of the kinds they are
meant for, at >= 95 % pair precision, and merge no two different images of one class. "crop" is the
embedding stage's job; its pHash/dHash recall is measured and printed but not asserted.
"""

from __future__ import annotations

import io
import itertools
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.helpers.curate_data import (
    ALL_KINDS,
    HASH_KINDS,
    make_eval_set,
    make_pool,
    plant_eval_copies,
)
from vfm.curate.hashing import (
    DHASH_MAX_DISTANCE,
    PHASH_MAX_DISTANCE,
    components,
    hamming,
    mih_keys,
    near_pairs,
)
from vfm.curate.quality import (
    DECODE_REASONS,
    ImageFeatures,
    QualityThresholds,
    analyze,
    quality_reason,
    thumbnail,
)

# --- hashing -------------------------------------------------------------------------------------------


def _planted_codes(rng: np.random.Generator, nbytes: int, n: int, close: int, max_flip: int) -> list[bytes]:
    """n random codes plus `close` codes made by flipping 0..max_flip bits of a random earlier one."""
    codes = [rng.bytes(nbytes) for _ in range(n)]
    for _ in range(close):
        c = bytearray(codes[int(rng.integers(len(codes)))])
        for p in rng.choice(nbytes * 8, int(rng.integers(0, max_flip + 1)), replace=False):
            c[p // 8] ^= 1 << (7 - p % 8)
        codes.append(bytes(c))
    return codes


def _brute(ids: list[int], codes: list[bytes], d: int) -> list[tuple[int, int, int]]:
    out = []
    for i, j in itertools.combinations(range(len(ids)), 2):
        h = hamming(codes[i], codes[j])
        if h <= d:
            out.append((min(ids[i], ids[j]), max(ids[i], ids[j]), h))
    return sorted(out)


def test_hamming():
    assert hamming(b"\x00\x00", b"\x00\x00") == 0
    assert hamming(b"\xff\x01", b"\x00\x00") == 9
    with pytest.raises(ValueError):
        hamming(b"\x00", b"\x00\x00")


@pytest.mark.parametrize(("nbytes", "max_distance", "chunk_bits"), [
    (8, 10, 16), (8, 8, 8), (8, 0, 16), (8, 12, 4), (8, 3, 32), (32, 40, 16), (32, 16, 8), (32, 23, 32)])
def test_near_pairs_equals_brute_force(nbytes, max_distance, chunk_bits):
    rng = np.random.default_rng(nbytes * 1000 + max_distance * 10 + chunk_bits)
    codes = _planted_codes(rng, nbytes, 250, 120, max_distance + 3)
    codes += codes[:5]  # exact repeats (distance 0)
    ids = rng.permutation(10 * len(codes))[: len(codes)].tolist()  # unsorted, non-contiguous ids
    got = near_pairs(ids, codes, max_distance, chunk_bits)
    want = _brute(ids, codes, max_distance)
    assert got == want
    assert len(want) > 20  # the planted pairs are there to be found


def test_mih_keys_share_a_key_within_max_distance():
    rng = np.random.default_rng(3)
    for nbytes, d, cb in [(8, 10, 16), (8, 7, 8), (32, 40, 16)]:
        for _ in range(200):
            a = rng.bytes(nbytes)
            b = bytearray(a)
            for p in rng.choice(nbytes * 8, int(rng.integers(0, d + 1)), replace=False):
                b[p // 8] ^= 1 << (7 - p % 8)
            ia, pa = mih_keys(a, d, cb)
            ib, pb = mih_keys(bytes(b), d, cb)
            assert len(ia) == 8 * nbytes // cb
            assert set(ia) & set(pb) and set(ib) & set(pa)
    with pytest.raises(ValueError, match="does not divide"):
        mih_keys(b"\x00" * 8, 10, chunk_bits=12)
    with pytest.raises(ValueError, match="probe keys"):
        mih_keys(b"\x00" * 32, 200, chunk_bits=32)


def test_near_pairs_input_checks():
    assert near_pairs([1], [b"\x00" * 8], 4) == []
    with pytest.raises(ValueError, match="unique"):
        near_pairs([1, 1], [b"\x00" * 8] * 2, 4)
    with pytest.raises(ValueError, match="same length"):
        near_pairs([1, 2], [b"\x00" * 8, b"\x00" * 4], 4)


def test_components():
    # chain 5-3-9 and pair 7-8; 1 alone
    pairs = [(5, 3, 1), (9, 3, 2), (7, 8)]
    rep = components([1, 3, 5, 7, 8, 9], pairs)
    assert rep == {1: 1, 3: 3, 5: 3, 9: 3, 7: 7, 8: 7}
    assert components(3, [(0, 2)]) == {0: 0, 1: 1, 2: 0}
    # a priority (e.g. keep the largest image): smallest key wins, ties by id
    size = {1: 10, 3: 10, 5: 50, 7: 5, 8: 5, 9: 50}
    rep = components([1, 3, 5, 7, 8, 9], pairs, priority=lambda i: -size[i])
    assert rep == {1: 1, 3: 5, 5: 5, 9: 5, 7: 7, 8: 7}
    assert components([3, 5], [(3, 5)], priority={3: 1, 5: 0}) == {3: 5, 5: 5}
    with pytest.raises(KeyError):
        components([1, 2], [(1, 4)])


# --- the planted pool ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    # 120 originals -> 96 copies, 16 of each kind (one miss moves a kind's recall by 6 points)
    planted = make_pool(tmp_path_factory.mktemp("pool"), originals=120, seed=0)
    feats = {p.name: analyze(p.read_bytes(), p.name) for p in sorted(planted.root.iterdir())}
    return planted, feats


def test_bad_inputs_get_their_reasons(pool):
    planted, feats = pool
    assert sorted(planted.bad.values()) == sorted(
        ["zero_bytes", "corrupt", "truncated", "too_small", "aspect", "low_entropy", "blurry", "grayscale"])
    with_gray = QualityThresholds(drop_grayscale=True)
    for name, want in planted.bad.items():
        f = feats[name]
        got = f if isinstance(f, str) else quality_reason(f, with_gray)
        assert got == want, (name, want, f)
    # grayscale photos are kept unless the recipe asks otherwise
    gray = next(n for n, r in planted.bad.items() if r == "grayscale")
    assert quality_reason(feats[gray], QualityThresholds()) is None
    # and nothing good is rejected, even with the grayscale filter on
    for name in planted.originals + list(planted.copies):
        f = feats[name]
        assert isinstance(f, ImageFeatures), (name, f)
        assert quality_reason(f, with_gray) is None, (name, planted.copies.get(name), f)


def test_features_shape(pool):
    planted, feats = pool
    f = feats[planted.originals[0]]
    assert len(f.phash) == 8 and len(f.dhash) == 8 and len(f.pixel_sha256) == 64
    assert f.ext in ("jpg", "png")
    assert {feats[n].ext for n in planted.originals} == {"jpg", "png"}
    big = analyze((planted.root / planted.originals[0]).read_bytes(), "x", hash_size=16)
    assert isinstance(big, ImageFeatures) and len(big.phash) == 32 and len(big.dhash) == 32


def _dedup(names: list[str], feats: dict[str, ImageFeatures], stages=("exact", "perceptual")) -> dict[str, str]:
    """The exact + perceptual stages as the lead's pipeline runs them: name -> representative name."""
    ids = list(range(len(names)))
    pairs: list[tuple[int, int]] = []
    if "exact" in stages:
        first: dict[str, int] = {}
        for i, n in enumerate(names):
            j = first.setdefault(feats[n].pixel_sha256, i)
            if j != i:
                pairs.append((j, i))
    if "perceptual" in stages:
        pairs += [(a, b) for a, b, _ in near_pairs(ids, [feats[n].phash for n in names], PHASH_MAX_DISTANCE)]
        pairs += [(a, b) for a, b, _ in near_pairs(ids, [feats[n].dhash for n in names], DHASH_MAX_DISTANCE)]
    rep = components(ids, pairs)
    return {names[i]: names[r] for i, r in rep.items()}


def _scores(planted, rep: dict[str, str]) -> tuple[dict[str, float], float, int, int]:
    """(recall per kind, pair precision, predicted pairs, false pairs)."""
    found: dict[str, list[bool]] = defaultdict(list)
    for copy, (kind, orig) in planted.copies.items():
        found[kind].append(rep[copy] == rep[orig])
    recall = {k: float(np.mean(v)) for k, v in found.items()}
    groups: dict[str, list[str]] = defaultdict(list)
    for n, r in rep.items():
        groups[r].append(n)
    truth = {frozenset((c, o)) for c, (_, o) in planted.copies.items()}
    predicted = [frozenset(p) for g in groups.values() for p in itertools.combinations(g, 2)]
    false = sum(p not in truth for p in predicted)
    precision = 1.0 - false / len(predicted) if predicted else 1.0
    return recall, precision, len(predicted), false


def test_exact_and_perceptual_dedup_recall_precision(pool):
    planted, feats = pool
    names = planted.originals + list(planted.copies)
    random.Random(0).shuffle(names)

    exact_recall, exact_precision, exact_pairs, _ = _scores(planted, _dedup(names, feats, ("exact",)))
    rep = _dedup(names, feats)
    recall, precision, n_pairs, false = _scores(planted, rep)
    hash_recall = float(np.mean([rep[c] == rep[o] for c, (k, o) in planted.copies.items() if k in HASH_KINDS]))

    lines = [f"dedup on make_pool(originals=120, seed=0): {len(planted.copies)} copies, "
             f"pHash<={PHASH_MAX_DISTANCE} or dHash<={DHASH_MAX_DISTANCE} (64-bit)",
             f"{'kind':<10} {'exact':>6} {'exact+perceptual':>17}"]
    for k in ALL_KINDS:
        lines.append(f"{k:<10} {exact_recall.get(k, 0.0):>6.2f} {recall[k]:>17.2f}")
    lines.append(f"recall over {', '.join(HASH_KINDS)}: {hash_recall:.3f}")
    lines.append(f"exact stage: {exact_pairs} pairs, precision {exact_precision:.3f}; "
                 f"exact+perceptual: {n_pairs} pairs, {false} false, precision {precision:.3f}")
    print("\n" + "\n".join(lines))

    assert exact_recall["resave"] == 1.0 and exact_precision == 1.0
    assert all(exact_recall.get(k, 0.0) == 0.0 for k in ALL_KINDS if k != "resave")  # pixels differ
    assert hash_recall >= 0.95
    assert precision >= 0.95
    for k in HASH_KINDS:
        assert recall[k] >= 0.9, (k, recall[k])
    for a, b in planted.distinct_same_class:
        assert rep[a] != rep[b], (a, b)


def test_eval_copies_found_across_sets(tmp_path):
    """Decontamination shape: copies of "val" images planted in a pool are found by a cross-set search."""
    planted = make_pool(tmp_path / "pool", originals=30, seed=4, bad=False)
    feats = {n: analyze((planted.root / n).read_bytes(), n) for n in planted.originals + list(planted.copies)}
    val = make_eval_set(tmp_path / "val", images=12)
    planted_copies = plant_eval_copies(planted, tmp_path / "val", val[:10], kinds=HASH_KINDS)
    vfeats = {n: analyze((tmp_path / "val" / n).read_bytes(), n) for n in val}
    cfeats = {n: analyze((planted.root / n).read_bytes(), n) for n in planted_copies}
    pool_names = planted.originals + list(planted.copies) + list(planted_copies)
    allf = {**feats, **cfeats}
    names = [f"val/{n}" for n in val] + pool_names
    getf = {**{f"val/{n}": f for n, f in vfeats.items()}, **allf}
    ids = list(range(len(names)))
    hits = set()
    for attr, d in (("phash", PHASH_MAX_DISTANCE), ("dhash", DHASH_MAX_DISTANCE)):
        for a, b, _ in near_pairs(ids, [getattr(getf[n], attr) for n in names], d):
            if names[a].startswith("val/") != names[b].startswith("val/"):
                hits.add(frozenset((names[a], names[b])))
    want = {frozenset((c, f"val/{v}")) for c, (_, v) in planted_copies.items()}
    assert want <= hits
    assert hits == want  # nothing else in the pool matches a val image


# --- analyze on hostile input ----------------------------------------------------------------------------


def _jpeg(size=(320, 240), **kw) -> bytes:
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(size=(320, 240)) -> bytes:
    arr = np.random.default_rng(6).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_analyze_never_raises_on_mangled_bytes():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    rng = np.random.default_rng(7)
    seen = set()
    for good in (_jpeg(), _png()):
        # stop short of the trailers: a JPEG missing only its EOI marker, or a PNG missing its last CRC and
        # IEND chunk, has all of its pixel data and decodes, which is fine
        for cut in np.linspace(1, len(good) - 64, 25).astype(int):
            r = analyze(good[:cut], "x.jpg")
            assert isinstance(r, str) and r in DECODE_REASONS, (cut, r)
            seen.add(r)
        for _ in range(60):
            b = bytearray(good)
            for p in rng.integers(0, len(b), int(rng.integers(1, 20))):
                b[p] = int(rng.integers(256))
            r = analyze(bytes(b), "x.jpg")
            assert isinstance(r, ImageFeatures | str)
            if isinstance(r, str):
                assert r in DECODE_REASONS
    for junk in (b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP", b"\x00" * 100):
        assert analyze(junk, "x") in ("corrupt", "truncated")
    assert {"truncated", "corrupt"} <= seen
    assert analyze(_png()[: len(_png()) // 2], "x.png") == "truncated"


def test_analyze_special_cases(monkeypatch):
    # decompression bombs: both PIL's hard error (> 2x the limit) and its warning band
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 320 * 240 // 3)
    assert analyze(_jpeg(), "x") == "too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 320 * 240 - 1)
    with pytest.warns(Image.DecompressionBombWarning):
        assert analyze(_jpeg(), "x") == "too_large"
    monkeypatch.undo()
    # a format PIL reads but a photo pool should not contain
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (1, 2, 3)).save(buf, "PPM")
    assert analyze(buf.getvalue(), "x.jpg") == "unsupported"
    # 16-bit grayscale keeps its picture (PIL's own convert would clip it to nearly white)
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(2).integers(0, 65535, (200, 300))).astype(np.uint16)).save(buf, "PNG")
    f16 = analyze(buf.getvalue(), "x.png")
    assert isinstance(f16, ImageFeatures) and f16.grayscale and f16.entropy > 7
    # the format comes from the bytes, not the name
    f = analyze(_png(), "photo.jpg")
    assert isinstance(f, ImageFeatures) and f.ext == "png"
    # the switch that would hide truncation is a process bug and is reported loudly
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        analyze(_jpeg(), "x")


def test_pixel_sha256_ignores_metadata_and_format(tmp_path):
    rgb = Image.open(io.BytesIO(_jpeg())).convert("RGB")
    as_png = io.BytesIO()
    rgb.save(as_png, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: not applied, pixels are hashed as stored
    with_exif = io.BytesIO()
    rgb.save(with_exif, "PNG", exif=exif.tobytes())
    a, b, c = (analyze(x, "x") for x in (_jpeg(), as_png.getvalue(), with_exif.getvalue()))
    assert a.pixel_sha256 == b.pixel_sha256 == c.pixel_sha256
    assert analyze(_jpeg(quality=70), "x").pixel_sha256 != a.pixel_sha256
    # same pixels in a transposed shape is a different key
    t = io.BytesIO()
    Image.frombytes("RGB", (240, 320), rgb.tobytes()).save(t, "PNG")
    assert analyze(t.getvalue(), "x").pixel_sha256 != a.pixel_sha256


def test_thumbnail_never_raises():
    im = thumbnail(_jpeg((400, 200)), 128)
    assert im.mode == "RGB" and im.size == (128, 64)
    assert thumbnail(b"", 64).size == (64, 64)
    assert thumbnail(b"not an image", 64).size == (64, 64)


def test_pool_is_deterministic(tmp_path):
    a = make_pool(tmp_path / "a", originals=6, seed=3)
    b = make_pool(tmp_path / "b", originals=6, seed=3)
    assert a.copies == b.copies and a.bad == b.bad and a.originals == b.originals
    for n in a.originals + list(a.copies) + list(a.bad):
        assert (Path(a.root) / n).read_bytes() == (Path(b.root) / n).read_bytes()
