"""Evaluation results: stable metric names, seed aggregation, claims beside achieved values, JSON, MLflow.

Metric names are `eval.<suite>.<metric>` (`eval.in1k.top1`, `eval.in_c.mce`, `eval.in_r.top1`,
`eval.knn.k20.top1`, ...). Accuracies and errors are in percent. Aggregated over fine-tuning seeds, a
name holds the mean and `<name>.std` the sample standard deviation (n − 1); the recipe reports the mean
(the paper's "seed 000 reports the mean of 3").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# recipe `claims` field → the metric it is compared with. DINOv2's k-NN number is the k = 20 column
# (dinov2/eval/knn.py: "20 is usually working the best").
CLAIM_METRICS: dict[str, str] = {"top1": "eval.in1k.top1", "knn_top1": "eval.knn.k20.top1"}
CLAIM_TAG_PREFIX = "claim."
SUITES: tuple[str, ...] = ("in1k", "in_c", "in_r", "knn", "linear", "ade20k", "coco")


def prefixed(suite: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {f"eval.{suite}.{k}": float(v) for k, v in metrics.items()}


def aggregate_seeds(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Mean and sample std of each metric over seeds: {name: mean, name.std: std, "eval.num_seeds": n}.

    Every seed must report the same metrics; a seed missing one is an error (the mean would silently
    cover fewer seeds otherwise). With one seed there is no std to report.
    """
    if not per_seed:
        raise ValueError("aggregate_seeds: no seed results")
    names = {s: set(m) for s, m in per_seed.items()}
    union = set().union(*names.values())
    for seed, have in names.items():
        if have != union:
            raise ValueError(f"aggregate_seeds: seed {seed} lacks {sorted(union - have)[:5]}; evaluate every seed "
                             "on the same suites before aggregating")
    n = len(per_seed)
    out: dict[str, float] = {}
    for name in sorted(union):
        values = [float(m[name]) for m in per_seed.values()]
        mean = sum(values) / n
        out[name] = mean
        if n > 1:
            out[f"{name}.std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    out["eval.num_seeds"] = float(n)
    return out


def claims_table(metrics: Mapping[str, float], claims: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """{metric: {"achieved": x | None, "claim": y}} for every claim that names an evaluation metric.

    `claims` is a recipe's `claims` (field → value) or a run's tags (`claim.<field>` → value).
    """
    table: dict[str, dict[str, float | None]] = {}
    for key, value in claims.items():
        field_name = key.removeprefix(CLAIM_TAG_PREFIX)
        metric = CLAIM_METRICS.get(field_name)
        if metric is None or value is None:
            continue
        table[metric] = {"achieved": metrics.get(metric), "claim": float(value)}
    return table


@dataclass
class EvalResults:
    recipe_id: str
    metrics: dict[str, float]
    claims: dict[str, dict[str, float | None]] = field(default_factory=dict)
    exports: list[dict[str, Any]] = field(default_factory=list)
    """ExportMeta of each evaluated checkpoint (one per seed)."""
    data: dict[str, str] = field(default_factory=dict)
    """Suite → manifest URL it was evaluated on."""
    per_seed: dict[str, dict[str, float]] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, url: str | Path) -> str:
        """To a local path or s3:// URL; a reader never sees half a file (vfm.storage.write_bytes)."""
        from vfm import storage

        storage.write_bytes(str(url), json.dumps(self.to_dict(), indent=2, sort_keys=True).encode())
        return str(url)

    @classmethod
    def read_json(cls, url: str | Path) -> EvalResults:
        from vfm import storage

        return cls(**json.loads(storage.read_bytes(str(url))))

    def log_to(self, run: Any, artifact_name: str = "eval/results.json") -> None:
        """Metrics under their stable names, the JSON as an artifact, and `achieved.*` tags for claims."""
        run.log_metrics(self.metrics)
        run.log_dict(self.to_dict(), artifact_name)
        run.set_tags({f"achieved.{m}": f"{v['achieved']:.4g}" for m, v in self.claims.items()
                      if v["achieved"] is not None})


def _fmt(v: float) -> str:
    """Percentages to 2 decimals; a small setting such as the probe's weight decay (1e-05) keeps its digits."""
    return f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.3g}"


def summary_rows(results: EvalResults, keys: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """(metric, achieved [± std], claim) rows for printing."""
    names = keys or [k for k in sorted(results.metrics) if not k.endswith(".std") and _headline(k)]
    rows = []
    for name in names:
        if name not in results.metrics:
            continue
        value = _fmt(results.metrics[name])
        if f"{name}.std" in results.metrics:
            value += f" ± {_fmt(results.metrics[f'{name}.std'])}"
        claim = results.claims.get(name, {}).get("claim")
        rows.append((name, value, "" if claim is None else f"{claim:g}"))
    return rows


def _headline(name: str) -> bool:
    """Names worth a line on the console; per-severity ImageNet-C errors stay in the JSON/MLflow."""
    if name.startswith("eval.in_c."):
        return name.rsplit(".", 1)[-1] in {"mce", "relative_mce", "mce_partial", "relative_mce_partial", "clean_err"}
    last = name.rsplit(".", 1)[-1]
    # dense transfer: AP, AP50, AP75 and mIoU lines; AP by object size and the detection count stay in MLflow
    return last not in ("num_seeds", "detections") and not last.endswith(("_small", "_medium", "_large"))
