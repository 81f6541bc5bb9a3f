"""Paper 002's kernel × expansion ablation report: one row per cell (kernel size, MLP ratio, params, FLOPs,
top-1/top-5 as mean over the cell's seeds), a Markdown table and a heatmap PNG of top-1 over the grid.

The pipeline's last step builds it from the cells' evaluation results and logs it to the parent MLflow
run; `vfm compare --ablation RUN` builds the same rows back from that run's evaluation child runs, so a
finished ablation can be redrawn from MLflow alone.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vfm.errors import UserError

METRICS = ("top1", "top5")
REPORT_MD, REPORT_PNG, REPORT_JSON = "ablation.md", "ablation.png", "ablation.json"


@dataclass
class CellRow:
    cell: str
    kernel_size: int
    mlp_ratio: float
    params: int
    gflops: float
    """Forward GFLOPs of one image at the cell's resolution (vfm.models.forward_flops)."""
    metrics: dict[str, float]
    """`top1` / `top5`: IN-1K subset val, mean over seeds; `<m>.std` beside them with more than one seed."""
    seeds: int


def architecture(recipe: Any, num_classes: int) -> tuple[int, float]:
    """(parameters, forward GFLOPs) of a cell's model, built on the meta device (nothing is allocated)."""
    from vfm.models import build_model, count_params, forward_flops
    from vfm.recipes.ablation import ABLATION_STAGE

    model = build_model(recipe, ABLATION_STAGE, num_classes=num_classes, device="meta")
    return count_params(model), forward_flops(model, recipe.stages[ABLATION_STAGE].data.resolution) / 1e9


def mean_metrics(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in METRICS:
        vals = [float(s[m]) for s in per_seed if m in s]
        if vals:
            out[m] = statistics.fmean(vals)
            if len(vals) > 1:
                out[f"{m}.std"] = statistics.stdev(vals)
    return out


def table(rows: Sequence[CellRow]) -> str:
    """Markdown: one line per cell, kernel-major."""
    lines = ["| cell | kernel | MLP ratio | params (M) | GFLOPs | top-1 | top-5 | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def fmt(m: str, r: CellRow = r) -> str:
            if m not in r.metrics:
                return "–"
            std = r.metrics.get(f"{m}.std")
            return f"{r.metrics[m]:.2f}" + (f" ± {std:.2f}" if std is not None else "")

        lines.append(f"| {r.cell} | {r.kernel_size} | {r.mlp_ratio:g} | {r.params / 1e6:.2f} | {r.gflops:.3f} | "
                     f"{fmt('top1')} | {fmt('top5')} | {r.seeds} |")
    return "\n".join(lines)


def heatmap(rows: Sequence[CellRow], path: str | Path, *, title: str, metric: str = "top1") -> Path:
    """`metric` (top-1) over kernel size (rows) × MLP ratio (columns); each cell annotated with params and GFLOPs."""
    import matplotlib

    matplotlib.use("Agg")  # no display in pods or CI
    import matplotlib.pyplot as plt
    import numpy as np

    if not rows:
        raise UserError("the ablation has no evaluated cells to draw")
    kernels = sorted({r.kernel_size for r in rows})
    ratios = sorted({r.mlp_ratio for r in rows})
    grid = np.full((len(kernels), len(ratios)), np.nan)
    by_pos = {(r.kernel_size, r.mlp_ratio): r for r in rows}
    for (k, q), r in by_pos.items():
        if metric in r.metrics:
            grid[kernels.index(k), ratios.index(q)] = r.metrics[metric]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(2.2 + 1.9 * len(ratios), 1.4 + 1.0 * len(kernels)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(ratios)), [f"{q:g}" for q in ratios])
    ax.set_yticks(range(len(kernels)), [f"{k}×{k}" for k in kernels])
    ax.set_xlabel("inverted-bottleneck expansion ratio")
    ax.set_ylabel("depthwise kernel")
    finite = grid[np.isfinite(grid)]
    mid = float(finite.mean()) if finite.size else 0.0
    for (k, q), r in by_pos.items():
        i, j = kernels.index(k), ratios.index(q)
        value = f"{r.metrics[metric]:.1f}" if metric in r.metrics else "–"
        ax.text(j, i, f"{value}\n{r.params / 1e6:.1f} M · {r.gflops:.3g} GFLOPs", ha="center", va="center",
                fontsize=8, color="black" if np.isfinite(grid[i, j]) and grid[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, label=f"IN-1K subset {metric} (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_report(run: Any, rows: Sequence[CellRow], *, title: str, metric: str = "top1") -> str:
    """Table, heatmap and rows (JSON) as artifacts of the parent `run` (a vfm.tracking.TrackedRun), and each
    cell's metrics on it (`ablation.<cell>.top1`, ...); returns the Markdown."""
    import tempfile

    md = f"# {title}\n\n{table(rows)}\n"
    with tempfile.TemporaryDirectory() as tmp:
        heatmap(rows, Path(tmp, REPORT_PNG), title=title, metric=metric)
        Path(tmp, REPORT_MD).write_text(md)
        Path(tmp, REPORT_JSON).write_text(json.dumps([asdict(r) for r in rows], indent=1))
        for name in (REPORT_PNG, REPORT_MD, REPORT_JSON):
            run.log_artifact(Path(tmp, name))
    run.log_metrics({f"ablation.{r.cell}.{m}": v for r in rows for m, v in r.metrics.items()}
                    | {f"ablation.{r.cell}.params_m": r.params / 1e6 for r in rows})
    return md


def rows_from_mlflow(client: Any, parent_run_id: str) -> list[CellRow]:
    """The rows of a finished ablation run, from its in1k evaluation child runs (tag `vfm.cell`; their params
    are the cell's resolved recipe, so kernel, ratio, variant and resolution come from there)."""
    from vfm.recipes import load_recipe
    from vfm.recipes.ablation import ABLATION_STAGE

    parent = client.get_run(parent_run_id)
    exp = parent.info.experiment_id
    evals = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`vfm.suite` = 'in1k'",
                               max_results=5000)
    by_cell: dict[str, list[Any]] = {}
    for run in evals:
        cell = run.data.tags.get("vfm.cell")
        if cell:
            by_cell.setdefault(cell, []).append(run)
    if not by_cell:
        raise UserError(f"MLflow run {parent_run_id} has no ablation cells (no in1k evaluation child run tagged "
                        "vfm.cell); pass the parent run of a `convnext-xl-ablation` pipeline run")
    rows = []
    for cell, runs in by_cell.items():
        p = runs[0].data.params
        overrides = [f"model.timm_name={p['model.timm_name']}",
                     f"model.kwargs={{kernel_sizes: {p['model.kwargs.kernel_sizes']}, "
                     f"mlp_ratio: {p['model.kwargs.mlp_ratio']}}}",
                     f"stages.{ABLATION_STAGE}.data.resolution={p[f'stages.{ABLATION_STAGE}.data.resolution']}"]
        recipe = load_recipe(parent.data.tags.get("vfm.recipe", "convnext-xl"), overrides,
                             parent.data.tags.get("vfm.profile", "paper"))
        params, gflops = architecture(recipe, int(p["ablation.subset.num_classes"]))
        per_seed = [{m: r.data.metrics[f"eval.in1k.{m}"] for m in METRICS if f"eval.in1k.{m}" in r.data.metrics}
                    for r in runs]
        rows.append(CellRow(cell=cell, kernel_size=int(p["model.kwargs.kernel_sizes"]),
                            mlp_ratio=float(p["model.kwargs.mlp_ratio"]), params=params, gflops=gflops,
                            metrics=mean_metrics(per_seed), seeds=len(runs)))
    return sorted(rows, key=lambda r: (r.kernel_size, r.mlp_ratio))
