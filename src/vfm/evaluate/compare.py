"""`vfm compare`: runs of one or more recipes side by side, read back from the MLflow server.

A table (recipe, stage, status, the datasets each run read, key metrics, the paper's claim beside the
achieved value), a PNG with the training-loss curves and the evaluation metrics as bars (claims as
markers), and one self-contained HTML file with both, for people without the MLflow UI — what one would
otherwise assemble by hand there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfm.errors import UserError
from vfm.evaluate.results import CLAIM_TAG_PREFIX, claims_table
from vfm.tracking import experiment_name, require_client

KEY_METRICS: tuple[tuple[str, str], ...] = (
    ("eval.in1k.top1", "IN-1K top-1"),
    ("eval.in1k.top5", "IN-1K top-5"),
    ("eval.in_c.mce", "IN-C mCE ↓"),
    ("eval.in_r.top1", "IN-R top-1"),
    ("eval.knn.k20.top1", "k-NN k=20"),
)
MAX_CURVES_PER_RUN = 2


@dataclass
class RunRow:
    experiment: str
    run_id: str
    name: str
    recipe: str
    stage: str
    status: str
    metrics: dict[str, float]
    profile: str
    parent_run_id: str
    claims: dict[str, dict[str, float | None]]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)  # "<name>@<digest> (<context>)" of its MLflow inputs


def _experiments(client: Any, names: Sequence[str]) -> list[Any]:
    if not names:
        found = [e for e in client.search_experiments() if e.name.startswith("vfm/")]
        if not found:
            raise UserError("no vfm experiments on this MLflow server (names start with `vfm/`); run a recipe first")
        return sorted(found, key=lambda e: e.name)
    out = []
    for name in names:
        full = name if name.startswith("vfm/") else experiment_name(name)
        exp = client.get_experiment_by_name(full)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments() if e.name.startswith("vfm/"))
            raise UserError(f"no MLflow experiment {full!r}; experiments here: {', '.join(known) or 'none'}")
        out.append(exp)
    return out


def collect_runs(experiments: Sequence[str] = (), *, tracking_uri: str | None = None,
                 max_runs: int = 200) -> list[RunRow]:
    """Every run of the experiments (recipe ids or `vfm/<id>` names; all vfm experiments when empty)."""
    client = require_client(tracking_uri, "vfm compare reads the MLflow server")
    rows: list[RunRow] = []
    for exp in _experiments(client, experiments):
        for run in client.search_runs([exp.experiment_id], max_results=max_runs, order_by=["attributes.start_time ASC"]):
            tags, metrics = run.data.tags, dict(run.data.metrics)
            claims = {k: v for k, v in tags.items() if k.startswith(CLAIM_TAG_PREFIX)}
            row = RunRow(experiment=exp.name, run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
                         recipe=tags.get("vfm.recipe", exp.name.removeprefix("vfm/")), stage=tags.get("vfm.stage", ""),
                         status=run.info.status, metrics=metrics, profile=tags.get("vfm.profile", ""),
                         parent_run_id=tags.get("mlflow.parentRunId", ""),
                         claims=claims_table(metrics, claims),
                         datasets=[f"{i.dataset.name}@{i.dataset.digest} ({_context(i)})"
                                   for i in (run.inputs.dataset_inputs if run.inputs else [])])
            for name in [m for m in sorted(metrics) if "loss" in m][:MAX_CURVES_PER_RUN]:
                history = client.get_metric_history(run.info.run_id, name)
                row.curves[name] = sorted((h.step, h.value) for h in history)
            rows.append(row)
    return rows


def _context(dataset_input: Any) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return next((t.value for t in dataset_input.tags if t.key == MLFLOW_DATASET_CONTEXT), "?")


def table_rows(rows: Sequence[RunRow]) -> list[list[str]]:
    """Header + one row per run: recipe, stage, run, status, datasets, key metrics, claim vs achieved."""
    out = [["recipe", "stage", "run", "status", "datasets", *[label for _, label in KEY_METRICS],
            "claim vs achieved"]]
    for r in rows:
        cells = []
        for metric, _ in KEY_METRICS:
            v = r.metrics.get(metric)
            std = r.metrics.get(f"{metric}.std")
            cells.append("" if v is None else f"{v:.2f}" + (f" ± {std:.2f}" if std is not None else ""))
        vs = []
        for metric, c in r.claims.items():
            achieved = "—" if c["achieved"] is None else f"{c['achieved']:.2f}"
            delta = "" if c["achieved"] is None else f" ({c['achieved'] - c['claim']:+.2f})"
            vs.append(f"{metric.removeprefix('eval.')}: {achieved} / {c['claim']:g}{delta}")
        out.append([r.recipe, r.stage, r.name, r.status, ", ".join(r.datasets), *cells, "; ".join(vs)])
    return out


def render_html(rows: Sequence[RunRow], png: str | Path, path: str | Path, *, title: str = "vfm runs") -> Path:
    """One self-contained HTML file: the runs table and the PNG (`render_png`'s) inlined as a data URI, so it
    can be mailed or attached to a ticket without the MLflow server."""
    import base64
    import html

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table_rows(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table[1:])
    image = base64.b64encode(Path(png).read_bytes()).decode()
    path.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}th{{background:#eee}}img{{max-width:100%}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p>{len(table) - 1} runs. Claims are the papers' figures at full scale.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
<h2>Training curves and evaluation</h2>
<img alt="training curves and evaluation metrics, with the papers' claims" src="data:image/png;base64,{image}">
</body></html>
""", encoding="utf-8")
    return path


def render_png(rows: Sequence[RunRow], path: str | Path) -> Path:
    """Training curves (left) and evaluation bars with claim markers (right)."""
    import matplotlib

    matplotlib.use("Agg")  # no display in pods or CI
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(14, 5))
    curves = [(r, name, pts) for r in rows for name, pts in r.curves.items() if pts]
    for r, name, pts in curves:
        steps, values = zip(*pts, strict=True)
        ax_curve.plot(steps, values, label=f"{r.recipe}/{r.stage} {r.name}: {name}")
    ax_curve.set_title("training curves")
    ax_curve.set_xlabel("step")
    _legend_or_say(ax_curve, bool(curves), "no loss metrics logged")

    evaluated = [r for r in rows if any(m in r.metrics for m, _ in KEY_METRICS)]
    # a pipeline run carries its seeds' mean ± std: one bar per pipeline run, not one per child run
    pipelines = [r for r in evaluated if r.stage == "pipeline"]
    evaluated = pipelines or evaluated
    metrics = [(m, label) for m, label in KEY_METRICS if any(m in r.metrics for r in evaluated)]
    width = 0.8 / max(1, len(evaluated))
    for i, r in enumerate(evaluated):
        xs = [j + i * width for j in range(len(metrics))]
        vals = [r.metrics.get(m, 0.0) for m, _ in metrics]
        errs = [r.metrics.get(f"{m}.std", 0.0) for m, _ in metrics]
        seeds = int(r.metrics.get("eval.num_seeds", 1))
        label = (f"{r.recipe} ({r.profile or 'paper'} profile) {r.name}, mean ± std of {seeds} seeds"
                 if r.stage == "pipeline" else f"{r.recipe}/{r.stage} {r.name}")
        ax_bar.bar(xs, vals, width, yerr=errs, capsize=4, label=label)
        for x, (m, _) in zip(xs, metrics, strict=True):
            if m in r.claims:
                ax_bar.plot([x - width / 2, x + width / 2], [r.claims[m]["claim"]] * 2, "k--", linewidth=1.5)
    ax_bar.set_xticks([j + width * (len(evaluated) - 1) / 2 for j in range(len(metrics))],
                      [label for _, label in metrics])
    ax_bar.set_title("evaluation (dashed: the paper's claim, at full scale)")
    ax_bar.set_ylabel("%")
    _legend_or_say(ax_bar, bool(evaluated), "no eval.* metrics logged")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _legend_or_say(ax, drawn: bool, empty: str) -> None:
    """The panel's legend, or a note in its middle saying why it is empty."""
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
