"""The suites end to end through the real shard writer and loader: a tiny timm model is exported, tiny
IN-1K-val / ImageNet-C / ImageNet-R / train sets are sharded, and `evaluate` must agree with a plain
reference loop over the same JPEGs (same transform, no loader, no sharding)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vfm.data.classes import imagenet_r_wnids, in1k_wnids
from vfm.evaluate.classify import topk_accuracy
from vfm.evaluate.knn import knn_classify, l2_normalise
from vfm.evaluate.robustness import imagenet_c_report
from vfm.evaluate.suite import EvalError, evaluate, evaluate_seeds

IN1K = list(in1k_wnids())
R_WNIDS = list(imagenet_r_wnids())


def _transform(meta):
    """timm's own eval transform, normalising on the CPU: the reference for vfm's uint8 + on-device path."""
    from timm.data.transforms_factory import transforms_imagenet_eval

    return transforms_imagenet_eval(img_size=meta.resolution, crop_pct=meta.crop_pct, interpolation="bicubic",
                                    mean=tuple(meta.mean), std=tuple(meta.std))


def _reference_logits(export: str, files: list[tuple[Path, str]]) -> tuple[torch.Tensor, list[str]]:
    from vfm.export import load_export

    model, meta = load_export(export)
    tf = _transform(meta)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in files])
    with torch.no_grad():
        return model(x), [w for _, w in files]


def test_in1k_in_c_in_r_match_reference(world):
    export = world["exports"][0]
    metrics = evaluate(export, ["in1k", "in_c", "in_r"], world["data"], batch_size=4)

    logits, wnids = _reference_logits(export, world["files"]["val"])
    ref = topk_accuracy(logits, torch.tensor([IN1K.index(w) for w in wnids]), (1, 5))
    assert metrics["eval.in1k.top1"] == pytest.approx(ref[1])
    assert metrics["eval.in1k.top5"] == pytest.approx(ref[5])

    # ImageNet-C: per (corruption, severity) errors from the reference, then the same report
    files_c = world["files"]["c"]
    logits, wnids = _reference_logits(export, files_c)
    hit = logits.argmax(1) == torch.tensor([IN1K.index(w) for w in wnids])
    errors = {}
    for key in [("fog", 1), ("fog", 2), ("spatter", 3)]:
        sel = [i for i, (p, _) in enumerate(files_c) if (p.parts[-4], int(p.parts[-3])) == key]
        errors[key] = 1.0 - hit[sel].float().mean().item()
    expected = imagenet_c_report(errors, clean_err=1 - ref[1] / 100)
    got = {k.removeprefix("eval.in_c."): v for k, v in metrics.items() if k.startswith("eval.in_c.")}
    assert got == pytest.approx(expected)
    assert "eval.in_c.fog.s2.err" in metrics and "eval.in_c.extra.spatter.s3.err" in metrics

    # ImageNet-R: argmax over the 200 masked columns, labels in sorted IN-R order
    logits, wnids = _reference_logits(export, world["files"]["r"])
    cols = [IN1K.index(w) for w in R_WNIDS]
    pred = logits[:, cols].argmax(1)
    ref_r = 100.0 * (pred == torch.tensor([R_WNIDS.index(w) for w in wnids])).float().mean().item()
    assert metrics["eval.in_r.top1"] == pytest.approx(ref_r)


def test_knn_matches_reference(world):
    export = world["exports"][0]
    metrics = evaluate(export, ["knn"], world["data"], batch_size=5, knn_ks=(1, 3, 10))
    from vfm.export import load_export

    model, _ = load_export(export)

    def feats(files):
        tf = _transform(world["meta"])
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in files])
        with torch.no_grad():
            return l2_normalise(model.forward_features(x)[:, 0]), torch.tensor([IN1K.index(w) for _, w in files])

    tr, trl = feats(world["files"]["train"])
    te, tel = feats(world["files"]["val"])
    ref = knn_classify(tr, trl, te, tel, ks=(1, 3, 10), num_classes=1000, block_size=10_000)
    assert {k.removeprefix("eval.knn."): v for k, v in metrics.items()} == pytest.approx(ref)


def test_linear_suite_is_the_probe_on_the_exports_cls_features_and_exports_a_classifier(world, tmp_path):
    from vfm.evaluate.linear import ProbeConfig, key_hashes, linear_probe

    export = world["exports"][0]
    cfg = ProbeConfig(weight_decays=(1e-2, 1e-3))
    metrics = evaluate(export, ["linear"], world["data"], batch_size=5, probe=cfg, linear_export=str(tmp_path / "clf"))
    from vfm.export import load_export

    model, _ = load_export(export)
    tf = _transform(world["meta"])

    def feats(files):
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in files])
        with torch.no_grad():  # the final-norm CLS token, not normalised: the probe standardises its inputs
            return model.forward_features(x)[:, 0], torch.tensor([IN1K.index(w) for _, w in files])

    tr, trl = feats(world["files"]["train"])
    te, tel = feats(world["files"]["val"])
    # the sample keys the shard writer gave the train files: their paths under the folder root, less the suffix
    root = world["root"] / "train"
    keys = [str(p.relative_to(root).with_suffix("")) for p, _ in world["files"]["train"]]
    ref, _ = linear_probe((tr, trl, key_hashes(keys)), (te, tel), 1000, cfg, device=torch.device("cpu"))
    assert {k.removeprefix("eval.linear."): v for k, v in metrics.items()} == pytest.approx(ref, abs=1e-3)
    # the exported classifier is an ordinary export: in1k runs on it unchanged and agrees with the probe
    clf, clf_meta = load_export(tmp_path / "clf")
    assert clf_meta.stage == "linear" and clf_meta.num_classes == 1000 and clf_meta.wnids == IN1K
    assert evaluate(str(tmp_path / "clf"), ["in1k"], world["data"], batch_size=5)["eval.in1k.top1"] == pytest.approx(
        metrics["eval.linear.top1"], abs=1e-3)


def test_seeds_aggregate_and_json(world, tmp_path):
    out = tmp_path / "results.json"
    res = evaluate_seeds(world["exports"], ["in1k"], {"in1k": world["data"]["in1k"]}, batch_size=6,
                         claims={"top1": 89.1}, out_json=out)
    seeds = [evaluate(e, ["in1k"], world["data"], batch_size=6)["eval.in1k.top1"] for e in world["exports"]]
    assert res.metrics["eval.in1k.top1"] == pytest.approx(sum(seeds) / 2)
    assert res.metrics["eval.num_seeds"] == 2
    assert res.claims == {"eval.in1k.top1": {"achieved": res.metrics["eval.in1k.top1"], "claim": 89.1}}
    assert set(res.per_seed) == {"0", "1"}
    assert out.is_file() and '"eval.in1k.top1.std"' in out.read_text()


def test_clear_errors(world):
    with pytest.raises(EvalError, match="no data for in_r"):
        evaluate(world["exports"][0], ["in_r"], {"in1k": world["data"]["in1k"]})
    with pytest.raises(EvalError, match="unknown"):
        evaluate(world["exports"][0], ["in1k", "imagenet-a"], world["data"])


def test_cli_user_errors(world, tmp_path):
    from typer.testing import CliRunner

    from vfm.cli import app
    from vfm.errors import UserError

    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(tmp_path), "--suite", "in1k", "--data", f"in1k={world['data']['in1k']}"])
    assert isinstance(res.exception, UserError) and "not a vfm export" in str(res.exception)
    res = runner.invoke(app, ["evaluate", world["exports"][0], "--suite", "in1k", "--data", world["data"]["in1k"]])
    assert isinstance(res.exception, UserError) and "dataset 'folder' does not name a suite" in str(res.exception)
    res = runner.invoke(app, ["evaluate", world["exports"][0], "--suite", "in_c", "--data", world["data"]["in_r"]])
    assert isinstance(res.exception, UserError) and "no data for in_c" in str(res.exception)
    res = runner.invoke(app, ["evaluate", world["exports"][0], "--suite", "linear", "--linear-weight-decays", "0,1e-4",
                              "--data", f"in1k={world['data']['in1k']}", "--data", f"knn_train={world['data']['knn_train']}"])
    assert isinstance(res.exception, UserError) and "--linear-weight-decays '0,1e-4'" in str(res.exception)
    res = runner.invoke(app, ["evaluate", world["exports"][0], "--suite", "linear", "--linear-blocks", "4",
                              "--linear-export", str(tmp_path / "clf"), "--data", f"in1k={world['data']['in1k']}",
                              "--data", f"knn_train={world['data']['knn_train']}"])
    assert isinstance(res.exception, UserError) and "export with --linear-blocks 1" in str(res.exception)
