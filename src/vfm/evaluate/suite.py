"""`evaluate(export, suites, data)`: the suites wired to the sharded-data loader.

Data: `data` maps a suite to the manifest it reads —
  in1k       IN-1K val (`vfm shard in1k-val`)
  in_c       ImageNet-C (`vfm shard imagenet-c`; samples carry corruption/severity)
  in_r       ImageNet-R (`vfm shard imagenet-r`; labels are IN-1K indices, scored through the 200-class mask)
  knn_train  the k-NN memory bank (IN-1K train); `knn` is the k-NN query set (defaults to `in1k`)

`ade20k` (ADE20K val, `vfm shard ade20k --split val`: mIoU, pixel and mean class accuracy) and `coco` (COCO val2017,
`vfm shard coco2017 --split val`: box and mask AP) evaluate the export of a downstream stage (a segmenter or a
detector, vfm.dense.build), reported under the stage's name: `eval.ade20k.miou`, `eval.ade20k_linear.miou`,
`eval.coco.box_ap`.

The `linear` suite trains a linear probe on `knn_train` (vfm.evaluate.linear: DINOv2's linear protocol, solved
by L-BFGS, the L2 penalty chosen on a held-out tenth of train) and reports it on `in1k`; with `linear_export`
the backbone and its probe are written as a classifier export, on which in1k, in_c and in_r run unchanged.

Every suite uses the export's eval transform (resize to resolution / crop_pct, centre-crop resolution,
the recipe's mean/std), including ImageNet-C, whose 224-px JPEGs are therefore resized like val
images (the AugMix convention: Resize(256) + CenterCrop(224), google-research/augmix@9b9824c
`imagenet.py` `test_c`; recorded in the results' `protocol`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vfm.dist import rank_and_world
from vfm.errors import UserError
from vfm.evaluate.classify import ALL, align_classes, classify
from vfm.evaluate.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, extract_features, knn_classify
from vfm.evaluate.linear import ProbeConfig
from vfm.evaluate.results import SUITES, EvalResults, aggregate_seeds, claims_table, prefixed
from vfm.evaluate.robustness import imagenet_c_report, imagenet_r_mask

log = logging.getLogger(__name__)

# which suite a bare manifest feeds, by the dataset name `vfm shard` records
SUITE_OF_DATASET = {"in1k-val": "in1k", "imagenet-c": "in_c", "imagenet-r": "in_r", "in1k": "knn_train",
                    "ade20k": "ade20k", "coco2017": "coco"}
# the dense suites and the task of the export each scores
DENSE_SUITES = {"ade20k": "semantic_segmentation", "coco": "object_detection"}


class EvalError(UserError):
    """The export, the data or the suite selection do not fit together; the message says how."""


def parse_suites(text: str | Sequence[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    suites = [s.strip() for s in items if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        raise EvalError(f"--suite {','.join(suites) or '(empty)'}: unknown {unknown}; choose from {','.join(SUITES)}")
    return list(dict.fromkeys(suites))


def required_data(suites: Sequence[str]) -> set[str]:
    need = {s for s in suites if s not in ("knn", "linear")}
    if "knn" in suites:
        need |= {"knn_train"}
    if "linear" in suites:
        need |= {"knn_train", "in1k"}
    return need


def check_data(suites: Sequence[str], data: Mapping[str, str]) -> None:
    missing = sorted(required_data(suites) - set(data))
    if "knn" in suites and "knn" not in data and "in1k" not in data:
        missing.append("knn (or in1k)")
    if missing:
        raise EvalError(f"no data for {', '.join(missing)}: pass --data SUITE=MANIFEST_URL for each "
                        "(in1k, in_c, in_r, knn_train, optionally knn; ade20k, coco: their val manifests)")
    dense = [s for s in suites if s in DENSE_SUITES]
    if dense and len(dense) < len(suites):
        raise EvalError(f"--suite {','.join(suites)}: {', '.join(dense)} score a downstream (dense) export and the "
                        "others a classifier or backbone; evaluate them in separate runs")


def evaluate(
    export: str | Path | tuple[torch.nn.Module, Any],
    suites: Sequence[str],
    data: Mapping[str, str],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    knn_ks: Sequence[int] = DEFAULT_KS,
    knn_temperature: float = DEFAULT_TEMPERATURE,
    knn_block_size: int = 4096,
    probe: ProbeConfig | None = None,
    linear_export: str | None = None,
) -> dict[str, float]:
    """Evaluate one export (a directory/s3 prefix, or an already loaded `(model, ExportMeta)`) on
    `suites`; returns `eval.<suite>.*` metrics, identical on every rank. Call on all ranks together."""
    from vfm.data.manifest import Manifest

    suites = parse_suites(suites)
    check_data(suites, data)
    model, meta = load_any_export(export, device) if isinstance(export, str | Path) else export
    manifests = {key: Manifest.load(url) for key, url in data.items() if key in required_data(suites) | {"knn"}}
    if "knn" in suites and "knn" not in manifests:
        manifests["knn"] = manifests["in1k"] if "in1k" in manifests else Manifest.load(data["in1k"])
    opts = dict(batch_size=batch_size, num_workers=num_workers, device=torch.device(device),
                autocast_dtype=autocast_dtype)
    metrics: dict[str, float] = {}
    if any(s in DENSE_SUITES for s in suites):
        return _dense(model, meta, suites, manifests, data, **opts)
    clean_err: float | None = None
    for suite in ("in1k", "in_c", "in_r", "knn", "linear"):  # in1k first: ImageNet-C's relative mCE needs its error
        if suite not in suites:
            continue
        try:
            if suite == "linear":
                got = _linear(model, manifests["knn_train"], manifests["in1k"], meta, probe or ProbeConfig(),
                              export_to=linear_export, **opts)
            elif suite == "knn":
                got = _knn(model, manifests["knn_train"], manifests["knn"], meta, ks=knn_ks,
                           temperature=knn_temperature, block_size=knn_block_size, **opts)
            else:
                _need_head(meta, suite)
                got = _classification(suite, model, manifests[suite], meta, clean_err=clean_err, **opts)
        except ValueError as exc:
            raise EvalError(f"{suite} on {data.get(suite, data.get('knn_train'))}: {exc}") from exc
        if suite == "in1k":
            clean_err = 1.0 - got["top1"] / 100.0
        metrics.update(prefixed(suite, got))
        log.info("%s: %s", suite, {k: round(v, 3) for k, v in got.items() if "." not in k})
    return metrics


def load_any_export(export: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """A classifier or backbone export (timm), or a downstream stage's dense export (vfm.dense.build)."""
    import json

    from vfm import storage
    from vfm.export import META, load_export

    url = storage.join(str(export), META)
    if storage.exists(url) and "dense" in json.loads(storage.read_bytes(url)).get("extra", {}):
        from vfm.dense.build import load_dense_export

        model, meta, _ = load_dense_export(str(export), device)
        return model, meta
    return load_export(export, device)


def _dense(model, meta, suites, manifests, data, *, batch_size, num_workers, device, autocast_dtype) -> dict[str, float]:
    """The dense suites of a downstream export, reported under its stage (eval.<stage>.<metric>)."""
    from vfm.dense.build import DenseSpec
    from vfm.evaluate.dense import evaluate_detection, evaluate_segmentation

    if "dense" not in meta.extra:
        raise EvalError(f"suites {', '.join(suites)} score a downstream stage's export; {meta.timm_name} of stage "
                        f"{meta.stage} has no dense head (train one with vfm train {meta.recipe_id} --stage ade20k|coco)")
    spec = DenseSpec(**meta.extra["dense"])
    metrics: dict[str, float] = {}
    for suite in suites:
        if spec.task != DENSE_SUITES[suite]:
            raise EvalError(f"suite {suite} scores {DENSE_SUITES[suite]}, but the export of stage {meta.stage} is a "
                            f"{spec.task} model")
        try:
            if spec.task == "semantic_segmentation":
                got = evaluate_segmentation(model, spec, manifests[suite], device=device, normalize=_normalize(meta, device),
                                            num_workers=num_workers, autocast_dtype=autocast_dtype)
            else:
                got = evaluate_detection(model, spec, manifests[suite], device=device, num_workers=num_workers,
                                         autocast_dtype=autocast_dtype)
        except ValueError as exc:
            raise EvalError(f"{suite} on {data.get(suite)}: {exc}") from exc
        metrics.update(prefixed(meta.stage, got))
        log.info("%s (%s): %s", suite, meta.stage, {k: round(v, 3) for k, v in got.items()})
    return metrics


def _need_head(meta: Any, suite: str) -> None:
    if meta.num_classes == 0:
        raise EvalError(f"suite {suite} scores a classifier, but the export ({meta.timm_name}, recipe {meta.recipe_id}, "
                        f"stage {meta.stage}) is a headless backbone; evaluate it with --suite knn, or evaluate "
                        "the fine-tuned export")


def _data_config(meta: Any):
    from vfm.recipes.schema import DataConfig

    return DataConfig(dataset="eval", resolution=meta.resolution, crop_pct=meta.crop_pct, mean=tuple(meta.mean),
                      std=tuple(meta.std))


def _normalize(meta: Any, device):
    from vfm.data.transforms import device_normalize

    return device_normalize(_data_config(meta), device, is_training=False)


def _loader(manifest: Any, meta: Any, *, batch_size: int, num_workers: int, with_meta: bool = False):
    from vfm.data.loader import build_loader
    from vfm.data.transforms import build_transform

    rank, world = rank_and_world()
    return build_loader(manifest, transform=build_transform(_data_config(meta), is_training=False),
                        batch_size=batch_size, rank=rank, world_size=world,
                        seed=0, shuffle=False, drop_last=False, num_workers=num_workers, with_meta=with_meta)


def _classification(suite: str, model, manifest, meta, *, clean_err: float | None, batch_size: int,
                    num_workers: int, device, autocast_dtype) -> dict[str, float]:
    keep = imagenet_r_mask(meta.wnids) if suite == "in_r" else None
    columns, label_map = align_classes(meta.wnids, manifest.classes, keep=keep, where=f"{suite} ({manifest.dataset})")
    in_c = suite == "in_c"
    group_by = _corruption_of if in_c else None
    loader = _loader(manifest, meta, batch_size=batch_size, num_workers=num_workers, with_meta=in_c)
    counts = classify(model, loader, device=device, columns=columns, label_map=label_map, group_by=group_by,
                      autocast_dtype=autocast_dtype, description=f"eval {suite}", normalize=_normalize(meta, device))
    _check_complete(suite, manifest, sum(c.total for c in counts.values()))
    if not in_c:
        return counts[ALL].accuracy()
    errors = {key: c.error(1) for key, c in counts.items()}
    if clean_err is None:
        log.warning("in_c: relative mCE needs the clean IN-1K error; add the in1k suite to report it")
    return imagenet_c_report(errors, clean_err)


def _corruption_of(row: dict[str, Any]) -> tuple[str, int]:
    try:
        return str(row["corruption"]), int(row["severity"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"sample {row.get('key')!r} has no corruption/severity metadata ({sorted(row)}); "
                         "shard ImageNet-C with `vfm shard imagenet-c`") from None


def _check_complete(suite: str, manifest: Any, seen: int) -> None:
    """The loader gives every sample to exactly one rank; a different total means lost or doubled data."""
    if seen != manifest.num_samples:
        raise ValueError(f"evaluated {seen} samples but the manifest {manifest.location or manifest.dataset} lists "
                         f"{manifest.num_samples}")


def _knn(model, train_manifest, test_manifest, meta, *, ks, temperature, block_size, batch_size, num_workers,
         device, autocast_dtype) -> dict[str, float]:
    kw = dict(device=device, autocast_dtype=autocast_dtype, normalize=_normalize(meta, device))
    train_feats, train_labels = extract_features(
        model, _loader(train_manifest, meta, batch_size=batch_size, num_workers=num_workers),
        description="knn: train features", **kw)
    test_feats, test_labels = extract_features(
        model, _loader(test_manifest, meta, batch_size=batch_size, num_workers=num_workers),
        description="knn: test features", **kw)
    if list(test_manifest.classes) != list(train_manifest.classes):
        _, label_map = align_classes(train_manifest.classes, test_manifest.classes, where="knn test set")
        if label_map is not None:
            test_labels = label_map.to(test_labels.device)[test_labels]
            if (test_labels < 0).any():
                raise ValueError("knn: the test set has classes the train set lacks; use the same class list")
    return knn_classify(train_feats, train_labels, test_feats, test_labels, ks=ks, temperature=temperature,
                        num_classes=len(train_manifest.classes), block_size=block_size)


def _linear(model, train_manifest, val_manifest, meta, cfg: ProbeConfig, *, batch_size, num_workers, device,
            autocast_dtype, export_to: str | None = None) -> dict[str, float]:
    """The probe's metrics; with `export_to`, rank 0 also writes the backbone + chosen head there as a
    classifier export."""
    from functools import partial

    from vfm.evaluate.linear import all_sum, extract, linear_probe, probe_features

    feature_fn = partial(probe_features, n_last_blocks=cfg.n_last_blocks, avgpool=cfg.avgpool)
    kw = dict(device=device, autocast_dtype=autocast_dtype, normalize=_normalize(meta, device))
    train = extract(model, _loader(train_manifest, meta, batch_size=batch_size, num_workers=num_workers,
                                   with_meta=True), feature_fn, description="linear: train features", **kw)
    _check_complete("linear", train_manifest, int(all_sum(torch.tensor([len(train[1])]), device).item()))
    val_feats, val_labels, _ = extract(model, _loader(val_manifest, meta, batch_size=batch_size,
                                                      num_workers=num_workers, with_meta=True),
                                       feature_fn, description="linear: val features", **kw)
    _, label_map = align_classes(train_manifest.classes, val_manifest.classes, where="linear probe val set")
    if label_map is not None:
        val_labels = label_map[val_labels]
        if (val_labels < 0).any():
            raise ValueError("linear probe: the val set has classes the train set lacks; use the same class list")
    metrics, head = linear_probe(train, (val_feats, val_labels), len(train_manifest.classes), cfg, device=device)
    if export_to is not None and rank_and_world()[0] == 0:
        from dataclasses import replace

        from vfm.evaluate.linear import with_head
        from vfm.export import save_export

        classes = list(train_manifest.classes)
        save_export(with_head(model, head, cfg), replace(meta, num_classes=len(classes), wnids=classes, stage="linear",
                                                        extra={**meta.extra, "linear_probe": metrics}), export_to)
    return metrics


def evaluate_seeds(
    exports: Sequence[str | Path],
    suites: Sequence[str],
    data: Mapping[str, str],
    *,
    claims: Mapping[str, Any] | None = None,
    run: Any = None,
    out_json: str | Path | None = None,
    **kwargs: Any,
) -> EvalResults:
    """Evaluate each fine-tuning seed's export, aggregate (mean ± std), put claims beside the achieved
    values, and (rank 0) write the JSON and log to the MLflow `run`. One export is one "seed"."""
    if not exports:
        raise EvalError("no checkpoint to evaluate: pass at least one export directory")
    per_seed: dict[str, dict[str, float]] = {}
    metas = []
    for i, export in enumerate(exports):
        model, meta = load_any_export(export, kwargs.get("device", "cpu"))
        seed = meta.seed if meta.seed is not None else i
        if str(seed) in per_seed:
            raise EvalError(f"{export}: seed {seed} is given twice; pass one export per fine-tuning seed")
        per_seed[str(seed)] = evaluate((model, meta), suites, data, **kwargs)
        metas.append({**vars(meta), "location": str(export)})
        del model
    recipes = {m["recipe_id"] for m in metas}
    if len(recipes) > 1:
        raise EvalError(f"the exports come from different recipes {sorted(recipes)}; aggregate one recipe at a time")
    metrics = aggregate_seeds(per_seed) if len(per_seed) > 1 else dict(next(iter(per_seed.values())))
    results = EvalResults(
        recipe_id=metas[0]["recipe_id"], metrics=metrics, claims=claims_table(metrics, claims or {}),
        exports=metas, data=dict(data), per_seed=per_seed if len(per_seed) > 1 else {},
        protocol={"transform": "resize resolution/crop_pct, centre-crop resolution, export mean/std "
                               "(ImageNet-C JPEGs too: AugMix convention)",
                  "knn": {"ks": list(kwargs.get("knn_ks", DEFAULT_KS)),
                          "temperature": kwargs.get("knn_temperature", DEFAULT_TEMPERATURE),
                          "features": "L2-normalised final-norm CLS token (timm pre-logits)"},
                  "in_c": "CE normalised by AlexNet (augmix ALEXNET_ERR); relative mCE with AlexNet clean 43.48 %",
                  "seeds": "mean and sample std (n-1) over fine-tuning seeds"},
    )
    rank, _ = rank_and_world()
    if rank == 0:
        if out_json is not None:
            results.write_json(out_json)
        if run is not None:
            results.log_to(run)
    return results
