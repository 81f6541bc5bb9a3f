"""The local default data: real digits in the official ImageNet archive layouts, read back by the same
readers as a user's ImageNet."""

from __future__ import annotations

import pytest

from vfm.data.classes import imagenet_r_wnids, in1k_wnids
from vfm.data.digits import DIGIT_WNIDS, make_digits_archives
from vfm.data.sources import index_source


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_archives(tmp_path_factory.mktemp("digits"))


def test_ten_real_wnids_of_the_imagenet_r_200():
    assert len(set(DIGIT_WNIDS)) == 10
    assert set(DIGIT_WNIDS) <= set(imagenet_r_wnids()) <= set(in1k_wnids())


@pytest.mark.parametrize(("layout", "count"), [("in1k", 1438), ("in22k-fall11", 1438), ("folder", 1438),
                                               ("in1k-val", 359), ("imagenet-r", 359)])
def test_every_layout_reads_back_whole(digits, layout, count):
    labels = {"labels": str(digits.val_labels)} if layout == "in1k-val" else {}
    index = index_source(layout, digits.source(layout), **labels)
    assert len(index) == count and not index.failures
    assert {index.classes[label] for label in index.label} == set(DIGIT_WNIDS)
    assert (digits.num_train, digits.num_val) == (1438, 359)


def test_the_split_is_fixed_and_stratified(digits, tmp_path):
    again = make_digits_archives(tmp_path / "again")
    assert again.train_tar.read_bytes() == digits.train_tar.read_bytes()
    assert again.val_labels.read_text() == digits.val_labels.read_text()
    rows = digits.val_labels.read_text().splitlines()[1:]
    per_class = {w: sum(r.split(",")[1].startswith(w) for r in rows) for w in DIGIT_WNIDS}
    assert all(34 <= n <= 38 for n in per_class.values()), per_class  # 20 % of ~180 per digit


def test_a_half_written_set_is_written_again(tmp_path):
    root = tmp_path / "d"
    made = make_digits_archives(root)
    made.val_tar.write_bytes(b"")  # a run killed before `.complete`
    (root / ".complete").unlink()
    assert make_digits_archives(root).val_tar.stat().st_size > 0


def test_a_layout_without_an_archive_is_a_clear_error(digits):
    with pytest.raises(ValueError, match="no digits archive in the 'in21k-winter21' layout"):
        digits.source("in21k-winter21")
