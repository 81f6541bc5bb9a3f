"""`vfm shard --subset-classes N --subset-fraction F --subset-seed S`: the ablation's IN-1K subset (paper
002). Train and val draw the same classes, membership depends on names only, and a destination holding
another subset is refused."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vfm.cli import app
from vfm.data.digits import make_digits_archives
from vfm.data.sources import SourceError, index_source, subset_index


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_archives(tmp_path_factory.mktemp("digits"))


def test_train_and_val_draw_the_same_classes_and_a_fraction_of_each(digits):
    train = index_source("in1k", str(digits.train_tar))
    val = index_source("in1k-val", str(digits.val_tar), labels=str(digits.val_labels))
    sub_t = subset_index(train, num_classes=4, fraction=0.5, seed=3)
    sub_v = subset_index(val, num_classes=4, seed=3)
    assert sub_t.classes == sub_v.classes == sorted(sub_t.classes) and len(sub_t.classes) == 4
    whole = Counter(train.classes[label] for label in train.label)
    kept = Counter(sub_t.classes[label] for label in sub_t.label)
    assert set(kept) == set(sub_t.classes)
    for c, n in kept.items():
        assert n == round(0.5 * whole[c])  # the fraction of each class, relabelled to the subset's order
    assert len(sub_v) == sum(1 for label in val.label if val.classes[label] in sub_t.classes)
    # the bytes are the same samples': subset entries point into the source archive
    i = 0
    name = sub_t.name(i)
    j = next(j for j in range(len(train)) if train.name(j) == name)
    assert sub_t.read(i) == train.read(j) and train.classes[train.label[j]] == sub_t.classes[sub_t.label[i]]
    # deterministic, and another seed draws other classes
    again = subset_index(train, num_classes=4, fraction=0.5, seed=3)
    assert [again.name(k) for k in range(len(again))] == [sub_t.name(k) for k in range(len(sub_t))]
    assert subset_index(train, num_classes=4, seed=4).classes != sub_t.classes
    with pytest.raises(SourceError, match="samples of 10 classes; choose 1..10"):
        subset_index(train, num_classes=11)


def test_the_cli_shards_the_subset_records_it_and_refuses_another_at_the_same_dest(digits, tmp_path):
    dest = tmp_path / "sub"
    run = CliRunner().invoke
    args = ["shard", "in1k", "--source", str(digits.train_tar), "--dest", str(dest), "--workers", "1"]
    res = run(app, [*args, "--subset-classes", "3", "--subset-fraction", "0.25"])
    assert res.exit_code == 0, res.output
    m = json.loads((dest / "manifest.json").read_text())
    assert len(m["classes"]) == 3 and m["class_subset"]["num_classes"] == 3 and m["class_subset"]["fraction"] == 0.25
    assert m["class_subset"]["of_samples"] == digits.num_train and 0 < m["num_samples"] < digits.num_train / 10 * 3
    assert m["failure_counts"] == {}  # left-out samples are not failures
    again = run(app, [*args, "--subset-classes", "3", "--subset-fraction", "0.25"])
    assert again.exit_code == 0 and "already complete" in again.output
    other = run(app, [*args, "--subset-classes", "3"])
    assert other.exit_code != 0
    assert "drawn as subset" in str(other.exception) + other.output
    lone = run(app, [*args, "--subset-fraction", "0.5"])
    assert lone.exit_code != 0 and "--subset-fraction needs --subset-classes" in lone.output


def test_an_explicit_class_list_is_kept_exactly_from_the_recipe_through_the_shard_step(digits, tmp_path):
    from vfm.data.digits import DIGIT_WNIDS
    from vfm.pipeline import steps
    from vfm.recipes import RecipeError, load_recipe

    train = index_source("in1k", str(digits.train_tar))
    listed = [DIGIT_WNIDS[7], DIGIT_WNIDS[2], DIGIT_WNIDS[4]]
    sub = subset_index(train, classes=listed, fraction=0.5)
    assert sub.classes == sorted(listed) and sub.class_subset["classes"] == sorted(listed)
    with pytest.raises(SourceError, match="1 of its 2 classes have no samples.*n99999999"):
        subset_index(train, classes=[DIGIT_WNIDS[0], "n99999999"])
    # a subset given as a list alone takes its size from it; a contradicting num_classes is refused
    r = load_recipe("convnext-xl", [f"ablation.subset={{classes: {listed}}}"], "smoke")
    assert r.ablation.subset.num_classes == 3 and r.ablation.subset.fraction == 1.0
    with pytest.raises(RecipeError, match="num_classes=5 but ablation.subset.classes lists 3; set num_classes=3"):
        load_recipe("convnext-xl", [f"ablation.subset.classes={listed}"], "smoke")  # smoke's 5 classes
    # the pipeline's shard step: train keeps the recipe's fraction, val keeps every image of those classes
    sets = [f"ablation.subset.classes={listed}", "ablation.subset.num_classes=3", "ablation.subset.fraction=0.5"]
    url, _ = steps.shard_subset(recipe_id="convnext-xl", profile="smoke", overrides=sets, dataset="in1k",
                                source=str(digits.train_tar), data_prefix=str(tmp_path), workers=1)
    val_url, _ = steps.shard_subset(recipe_id="convnext-xl", profile="smoke", overrides=sets, dataset="in1k-val",
                                    source=str(digits.val_tar), labels=str(digits.val_labels),
                                    data_prefix=str(tmp_path), workers=1)
    m, v = json.loads(Path(url).read_text()), json.loads(Path(val_url).read_text())
    assert m["classes"] == v["classes"] == sorted(listed)
    assert Path(url).parent.name.startswith("in1k-3c-f0.5-list") and v["class_subset"]["fraction"] == 1.0
    assert m["num_samples"] == len(sub)
    other = tmp_path / "other.txt"
    other.write_text(f"{DIGIT_WNIDS[1]}\n{DIGIT_WNIDS[2]}\n{DIGIT_WNIDS[4]}\n")
    res = CliRunner().invoke(app, ["shard", "in1k", "--source", str(digits.train_tar), "--dest", str(Path(url).parent),
                                   "--workers", "1", "--subset-class-file", str(other), "--subset-fraction", "0.5"])
    assert res.exit_code != 0 and "drawn as subset" in str(res.exception) + res.output
