"""The curation report: what went in, what each stage removed and why (per source), what came out, the thresholds,
and a PNG grid of example duplicate pairs and filtered images, in the MLflow run of the curation step (a child of
the pipeline's run) and beside the shards (`_curate/report.json`, `_curate/decisions.parquet`)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vfm.curate.run import ID_SHIFT, CurateResult

TILE = 96  # px of a thumbnail in the example grid
EXAMPLES = 6  # pairs per dedup stage, images per filter reason


def metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat counts for MLflow: images in, kept and written; removed per stage, per stage × reason, per source."""
    out: dict[str, float] = {"images": float(sum(s["images"] for s in report["sources"].values())),
                             "kept": float(report["kept"]), "written": float(report["written"])}
    for stage, reasons in report["removed"].items():
        out[f"removed.{stage}"] = float(sum(sum(by_src.values()) for by_src in reasons.values()))
        for reason, by_src in reasons.items():
            out[f"removed.{stage}.{reason}"] = float(sum(by_src.values()))
            for src, n in by_src.items():
                out[f"removed.{stage}.{reason}.{src}"] = float(n)
    for src, s in report["sources"].items():
        out[f"source.{src}.images"] = float(s["images"])
        out[f"source.{src}.kept"] = float(s["kept"])
    return out


def _label(text: str) -> Any:
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (TILE, TILE), (40, 40, 40))
    ImageDraw.Draw(tile).multiline_text((4, 4), "\n".join(text[i:i + 14] for i in range(0, len(text), 14))[:90],
                                        fill=(230, 230, 230))
    return tile


def _thumb(result: CurateResult, image_id: int) -> Any:
    """A TILE-sized thumbnail of an image by its id, or a tile that says why there is none."""
    from vfm.curate.quality import thumbnail

    by_rank = {inp.rank: inp for inp in result.inputs}
    inp = by_rank.get(image_id >> ID_SHIFT)
    if inp is None:
        return _label(f"id {image_id}")
    entry = image_id & ((1 << ID_SHIFT) - 1)
    try:
        return thumbnail(inp.index.read(entry), TILE).convert("RGB")
    except Exception as exc:  # a corrupt image is exactly what the grid shows as filtered
        return _label(f"{inp.index.name(entry)}: {type(exc).__name__}")


def example_grid(result: CurateResult) -> bytes | None:
    """PNG: one row per dedup stage (kept | removed pairs) and per filter reason (removed images), captioned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, list[Any]]] = []
    for stage, pairs in result.examples.items():
        tiles = []
        for kept, removed in pairs[:EXAMPLES]:
            tiles += [_thumb(result, kept), _thumb(result, removed)]
        if tiles:
            rows.append((f"{stage}: kept | removed", tiles))
    table = result.decisions
    if table is not None and table.num_rows:
        stage = np.array(table.column("stage").to_pylist())
        reason = np.array(table.column("reason").to_pylist())
        ids = np.array(table.column("id").to_pylist())
        for st in ("decode", "quality", "retrieval"):
            for why in sorted(set(reason[stage == st])):
                picked = ids[(stage == st) & (reason == why)][:EXAMPLES]
                rows.append((f"{st}: {why}", [_thumb(result, int(i)) for i in picked]))
    if not rows:
        return None
    cols = max(len(t) for _, t in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.5 * len(rows)), squeeze=False)
    for r, (title, tiles) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(tiles):
                ax.imshow(np.asarray(tiles[c]))
        axes[r][0].set_title(title, fontsize=7, loc="left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def log_report(result: CurateResult, run: Any) -> None:
    """Into an open vfm.tracking.TrackedRun: counts as metrics, thresholds as params, report + grid as artifacts,
    the output manifest as the run's dataset."""
    if not run.enabled:
        return
    report = result.report
    run.log_metrics(metrics(report))
    run.log_params({f"curate.{k}": v for k, v in _flat(report["thresholds"]).items()})
    run.log_dict(report, "curation/report.json")
    grid = example_grid(result) if result.inputs else None
    with tempfile.TemporaryDirectory() as tmp:
        if grid is not None:
            path = Path(tmp, "examples.png")
            path.write_bytes(grid)
            run.log_artifact(path, "curation")
        if result.decisions is not None:
            import pyarrow.parquet as pq

            path = Path(tmp, "decisions.parquet")
            pq.write_table(result.decisions, path)
            run.log_artifact(path, "curation")
    run.log_dataset(result.manifest, "training")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out
