"""Known-answer tests: top-k on constructed logits, ImageNet-C mCE by hand, the ImageNet-R mask,
class alignment, seed aggregation and claims."""

from __future__ import annotations

from importlib import resources

import pytest
import torch

from vfm.data.classes import imagenet_r_wnids, in1k_wnids
from vfm.evaluate.classify import ALL, TopkCounts, align_classes, classify, topk_accuracy
from vfm.evaluate.results import EvalResults, aggregate_seeds, claims_table, summary_rows
from vfm.evaluate.robustness import (
    ALEXNET_CLEAN_ERR,
    ALEXNET_ERR,
    CORRUPTIONS,
    imagenet_c_report,
    imagenet_r_mask,
)

# ---- top-k ---------------------------------------------------------------------------------------


def test_topk_on_constructed_logits():
    logits = torch.tensor([
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # label 1: top-1 hit
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # label 2: rank 2 → top-5 hit only
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0: rank 6 → miss
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 4: rank 5 → top-5 hit
    ])
    labels = torch.tensor([1, 2, 0, 4])
    assert topk_accuracy(logits, labels, (1, 5)) == {1: 25.0, 5: 75.0}
    counts = TopkCounts((1, 5))
    counts.update(logits[:2], labels[:2])
    counts.update(logits[2:], labels[2:])
    assert (counts.correct, counts.total) == ({1: 1, 5: 3}, 4)
    assert counts.accuracy() == {"top1": 25.0, "top5": 75.0}
    assert counts.error(1) == 0.75


def test_topk_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))


class _Fixed(torch.nn.Module):
    """Returns the logits stored for each input id (the image tensor carries the id)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table[x[:, 0].long()]


def test_classify_groups_and_columns():
    table = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    ids = torch.arange(4).float().view(4, 1)
    batches = [
        {"image": ids[:3], "label": torch.tensor([1, 1, 2]),
         "meta": [{"corruption": "fog", "severity": 1}, {"corruption": "fog", "severity": 2},
                  {"corruption": "fog", "severity": 1}]},
        {"image": ids[3:], "label": torch.tensor([1]), "meta": {"corruption": ["fog"], "severity": torch.tensor([2])}},
    ]
    out = classify(_Fixed(table), batches, ks=(1,), group_by=lambda m: (m["corruption"], int(m["severity"])))
    assert {k: (v.correct[1], v.total) for k, v in out.items()} == {("fog", 1): (2, 2), ("fog", 2): (1, 2)}
    # column restriction + label map: keep columns 1, 2 → dataset label 1 ↦ 0, 2 ↦ 1
    out = classify(_Fixed(table), [(ids, torch.tensor([1, 1, 2, 1]))], ks=(1,),
                   columns=torch.tensor([False, True, True]), label_map=torch.tensor([-1, 0, 1]))
    assert (out[ALL].correct[1], out[ALL].total) == (4, 4)  # sample 1's winning column 0 is masked away
    with pytest.raises(ValueError, match="cannot predict"):
        classify(_Fixed(table), [(ids, torch.tensor([0, 1, 2, 1]))], columns=torch.tensor([False, True, True]),
                 label_map=torch.tensor([-1, 0, 1]))
    with pytest.raises(ValueError, match="with_meta=True"):
        classify(_Fixed(table), [(ids, torch.tensor([0, 1, 2, 1]))], group_by=lambda m: m["corruption"])


# ---- ImageNet-C ----------------------------------------------------------------------------------


def _all_errors(value_of) -> dict[tuple[str, int], float]:
    return {(c, s): value_of(c, s) for c in CORRUPTIONS for s in range(1, 6)}


def test_mce_by_hand():
    errors = _all_errors(lambda c, s: ALEXNET_ERR[c])  # a model exactly as bad as AlexNet
    errors.update({("gaussian_noise", s): e for s, e in zip(range(1, 6), [0.2, 0.3, 0.4, 0.5, 0.6], strict=True)})
    report = imagenet_c_report(errors, clean_err=0.1)
    # gaussian_noise: Σ_s E = 2.0, Σ_s E_AlexNet = 5 × 0.886428 = 4.43214 → CE = 45.1249 %
    assert report["gaussian_noise.ce"] == pytest.approx(100 * 2.0 / 4.43214)
    assert report["gaussian_noise.ce"] == pytest.approx(45.1249, abs=1e-4)
    assert report["fog.ce"] == pytest.approx(100.0)
    # mCE = (45.1249 + 14 × 100) / 15 = 96.3417 %
    assert report["mce"] == pytest.approx((45.12493 + 1400) / 15, abs=1e-4)
    # relative CE: (2.0 − 5 × 0.1) / (4.43214 − 5 × 0.4348) = 1.5 / 2.25814 = 66.4263 %
    assert report["gaussian_noise.relative_ce"] == pytest.approx(66.4263, abs=1e-4)
    assert report["gaussian_noise.s3.err"] == pytest.approx(40.0)
    assert report["gaussian_noise.err"] == pytest.approx(40.0)
    assert report["clean_err"] == pytest.approx(10.0)


def test_alexnet_is_100_percent():
    report = imagenet_c_report(_all_errors(lambda c, s: ALEXNET_ERR[c]), clean_err=ALEXNET_CLEAN_ERR)
    assert report["mce"] == pytest.approx(100.0)
    assert report["relative_mce"] == pytest.approx(100.0)


def test_extras_apart_and_partial_is_labelled():
    errors = {("fog", s): 0.5 for s in range(1, 6)}
    errors.update({("spatter", 1): 0.3, ("spatter", 5): 0.5, ("snow", 1): 0.4})
    report = imagenet_c_report(errors)
    assert "mce" not in report and "relative_mce" not in report
    assert report["mce_partial"] == pytest.approx(100 * 2.5 / (5 * ALEXNET_ERR["fog"]))
    assert report["mce_corruptions"] == 1.0  # snow has one severity only: no CE for it
    assert "snow.ce" not in report and report["snow.s1.err"] == pytest.approx(40.0)
    assert report["extra.spatter.err"] == pytest.approx(40.0)
    assert "spatter.ce" not in report and "extra.spatter.ce" not in report


def test_in_c_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        imagenet_c_report({("rain", 1): 0.5})
    with pytest.raises(ValueError, match="severity 6"):
        imagenet_c_report({("fog", 6): 0.5})
    with pytest.raises(ValueError, match="not a fraction"):
        imagenet_c_report({("fog", 1): 50.0})


# ---- ImageNet-R ----------------------------------------------------------------------------------


def test_imagenet_r_mask_matches_timm_indices():
    mask = imagenet_r_mask(in1k_wnids())
    assert mask.shape == (1000,) and int(mask.sum()) == 200
    text = resources.files("timm.data").joinpath("_info", "imagenet_r_indices.txt").read_text()
    timm_indices = [int(x) for x in text.split()]
    assert mask.nonzero().flatten().tolist() == timm_indices
    # the first ten imagenet_r_indices of hendrycks/imagenet-r eval.py (line 25) and timm's _info list
    assert mask.nonzero().flatten().tolist()[:10] == [1, 2, 4, 6, 8, 9, 11, 13, 22, 23]


def test_imagenet_r_alignment_official_order():
    """IN-R shards keep IN-1K labels; the aligned labels must be IN-R's sorted 0..199 and the kept
    columns the official mask."""
    head = list(in1k_wnids())
    mask = imagenet_r_mask(head)
    columns, label_map = align_classes(head, head, keep=mask, where="in_r")
    assert torch.equal(columns, mask)
    r = list(imagenet_r_wnids())
    assert r == sorted(r)
    assert [label_map[head.index(w)].item() for w in r] == list(range(200))
    assert int((label_map >= 0).sum()) == 200
    # a logit row whose max over all 1000 is outside IN-R but whose max over the 200 is the label
    logits = torch.zeros(1, 1000)
    logits[0, 0] = 9.0  # tench: not an IN-R class
    logits[0, head.index(r[5])] = 1.0
    assert logits[:, columns].argmax(dim=1).item() == label_map[head.index(r[5])].item() == 5


def test_imagenet_r_mask_needs_the_classes():
    with pytest.raises(ValueError, match="has 0 of the 200"):
        imagenet_r_mask(["n00000001", "n00000002"])


def test_align_identical_and_missing():
    assert align_classes(["a", "b"], ["a", "b"], where="x") == (None, None)
    cols, lm = align_classes(["b", "a", "c"], ["a", "b"], where="x")
    assert cols is None and lm.tolist() == [1, 0]
    with pytest.raises(ValueError, match="none of the dataset's classes"):
        align_classes(["a"], ["z"], where="x")
    with pytest.raises(ValueError, match="no wnids"):
        align_classes([], ["z"], where="x")


# ---- seeds and claims ----------------------------------------------------------------------------


def test_aggregate_seeds_mean_and_sample_std():
    per_seed = {0: {"eval.in1k.top1": 88.0, "eval.in_c.mce": 40.0},
                1: {"eval.in1k.top1": 89.0, "eval.in_c.mce": 42.0},
                2: {"eval.in1k.top1": 90.0, "eval.in_c.mce": 44.0}}
    agg = aggregate_seeds(per_seed)
    assert agg["eval.in1k.top1"] == pytest.approx(89.0)
    assert agg["eval.in1k.top1.std"] == pytest.approx(1.0)  # sqrt(((−1)² + 0 + 1²) / 2)
    assert agg["eval.in_c.mce"] == pytest.approx(42.0)
    assert agg["eval.in_c.mce.std"] == pytest.approx(2.0)
    assert agg["eval.num_seeds"] == 3.0
    assert "eval.in1k.top1.std" not in aggregate_seeds({0: {"eval.in1k.top1": 1.0}})
    with pytest.raises(ValueError, match="seed 1 lacks"):
        aggregate_seeds({0: {"a": 1.0, "b": 2.0}, 1: {"a": 1.0}})


def test_claims_beside_achieved(tmp_path):
    metrics = {"eval.in1k.top1": 88.5, "eval.knn.k20.top1": 70.0}
    from_recipe = claims_table(metrics, {"top1": 89.1, "knn_top1": None, "duration_days": 21})
    assert from_recipe == {"eval.in1k.top1": {"achieved": 88.5, "claim": 89.1}}
    from_tags = claims_table(metrics, {"claim.knn_top1": "78.5", "claim.params_millions": "450"})
    assert from_tags == {"eval.knn.k20.top1": {"achieved": 70.0, "claim": 78.5}}
    res = EvalResults("vit-huge", {**metrics, "eval.in1k.top1.std": 0.5}, from_recipe)
    back = EvalResults.read_json(res.write_json(tmp_path / "r.json"))
    assert back == res
    assert ("eval.in1k.top1", "88.50 ± 0.50", "89.1") in summary_rows(res)
