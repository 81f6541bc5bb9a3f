"""`vfm evaluate` and `vfm compare`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import typer

from vfm.errors import UserError

UriOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow server (default: $MLFLOW_TRACKING_URI).")]


def parse_data(items: list[str]) -> dict[str, str]:
    """`SUITE=URL` pairs; a bare manifest URL is assigned by the dataset `vfm shard` recorded in it."""
    from vfm.data.manifest import Manifest
    from vfm.evaluate.suite import SUITE_OF_DATASET

    data: dict[str, str] = {}
    for item in items:
        key, sep, url = item.partition("=")
        if not sep or "://" in key or "/" in key:
            url = item
            dataset = Manifest.load(url).dataset
            if dataset not in SUITE_OF_DATASET:
                raise UserError(f"--data {url}: dataset {dataset!r} does not name a suite; write SUITE={url} "
                                "(in1k, in_c, in_r, knn_train, knn)")
            key = SUITE_OF_DATASET[dataset]
        if key in data:
            raise UserError(f"--data: two manifests for {key} ({data[key]}, {url}); pass one")
        data[key] = url
    return data


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        checkpoints: Annotated[list[str], typer.Argument(
            help="Export dir(s), s3:// prefix(es) or registry models (models:/vfm-<recipe>@champion); several = seeds.")],
        suite: Annotated[str, typer.Option("--suite", help="Comma list of in1k,in_c,in_r,knn,linear (linear: a "
                                           "probe trained on knn_train, scored on in1k); ade20k or coco for the "
                                           "export of a downstream stage (mIoU; box/mask AP).")] = "in1k",
        data: Annotated[list[str] | None, typer.Option(
            "--data", help="SUITE=MANIFEST_URL (in1k, in_c, in_r, knn_train, knn, ade20k, coco), or a bare manifest "
            "URL.")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
        workers: Annotated[int, typer.Option("--workers", help="Loader worker processes per rank.")] = 0,
        device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N (default: cuda if present).")] = "",
        bf16: Annotated[bool, typer.Option("--bf16", help="bf16 autocast.")] = False,
        knn_k: Annotated[str, typer.Option("--knn-k", help="Comma list of k.")] = "10,20,100,200",
        knn_t: Annotated[float, typer.Option("--knn-temperature")] = 0.07,
        linear_blocks: Annotated[int, typer.Option("--linear-blocks", help="Linear probe: CLS tokens of the last "
                                                   "N blocks (DINOv2 uses 1 or 4).")] = 1,
        linear_avgpool: Annotated[bool, typer.Option("--linear-avgpool", help="Linear probe: add the mean patch "
                                                     "token.")] = False,
        linear_wds: Annotated[str | None, typer.Option("--linear-weight-decays", help="Linear probe: comma list of "
                                                       "L2 penalties, one head each, chosen on held-out train "
                                                       "(default 1e-7 … 1e-2).")] = None,
        linear_max_iter: Annotated[int, typer.Option("--linear-max-iter", help="Linear probe: L-BFGS iterations "
                                                     "per head.")] = 1000,
        linear_export: Annotated[str | None, typer.Option("--linear-export", help="Linear probe: write the backbone "
                                                          "with the chosen head here (a path or s3:// prefix), a "
                                                          "classifier export the in1k/in_c/in_r suites read.")] = None,
        out: Annotated[str, typer.Option("--out", help="Results JSON: a path or s3:// URL.")] = "eval-results.json",
        tracking_uri: UriOpt = None,
        run_key: Annotated[str | None, typer.Option("--run-key", help="MLflow run key (re-opens that run).")] = None,
        parent_run_id: Annotated[str | None, typer.Option("--parent-run-id")] = None,
        run_name: Annotated[str | None, typer.Option("--run-name", help="MLflow run name.")] = None,
        tag: Annotated[list[str] | None, typer.Option("--tag", help="MLflow tag KEY=VALUE (repeatable).")] = None,
        profile: Annotated[str | None, typer.Option("--profile", help="The recipe profile the export was trained "
                                                    "with (default: the one its model.json records).")] = None,
        overrides: Annotated[list[str] | None, typer.Option("--set", help="The recipe overrides it was trained "
                                                            "with (for the run's params).")] = None,
    ) -> None:
        """Top-1/5, ImageNet-C mCE, ImageNet-R and k-NN of an export (ADE20K mIoU, COCO AP of a downstream stage's);
        mean ± std over several seeds."""
        import torch

        from vfm.dist import rank_and_world
        from vfm.evaluate.results import summary_rows
        from vfm.evaluate.suite import check_data, evaluate_seeds, parse_suites
        from vfm.registry import resolve_model_uri

        checkpoints = [resolve_model_uri(c, tracking_uri) for c in checkpoints]
        suites = parse_suites(suite)
        data_map = parse_data(list(data or []))
        check_data(suites, data_map)
        try:
            ks = [int(k) for k in knn_k.split(",") if k.strip()]
        except ValueError:
            raise UserError(f"--knn-k {knn_k!r}: expected a comma list of integers such as 10,20,100,200") from None
        from vfm.evaluate.linear import DEFAULT_WEIGHT_DECAYS, ProbeConfig, grid

        try:
            wds = grid([float(v) for v in linear_wds.split(",")] if linear_wds else DEFAULT_WEIGHT_DECAYS)
        except ValueError as exc:
            raise UserError(f"--linear-weight-decays {linear_wds!r}: {exc}") from None
        if linear_blocks < 1 or linear_max_iter < 1:
            raise UserError(f"--linear-blocks {linear_blocks} / --linear-max-iter {linear_max_iter}: give 1 or more")
        probe = ProbeConfig(n_last_blocks=linear_blocks, avgpool=linear_avgpool, weight_decays=wds,
                            max_iter=linear_max_iter)
        if linear_export and ("linear" not in suites or len(checkpoints) != 1):
            raise UserError(f"--linear-export {linear_export}: needs --suite linear and exactly one checkpoint "
                            "(one classifier per backbone)")
        if linear_export and (linear_blocks != 1 or linear_avgpool):
            raise UserError(f"--linear-export with --linear-blocks {linear_blocks}"
                            + (" --linear-avgpool" if linear_avgpool else "") + ": only the final CLS token (or "
                            "ConvNeXt's pooled features) feeds a timm classifier; export with --linear-blocks 1")
        _init_distributed()
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        from vfm.tracking import parse_tags

        tags = parse_tags(tag)
        recipe, claims = _recipe_of(checkpoints[0], profile, list(overrides or []))
        kwargs = dict(batch_size=batch_size, num_workers=workers, device=dev, knn_ks=ks, knn_temperature=knn_t,
                      autocast_dtype=torch.bfloat16 if bf16 else None, probe=probe, linear_export=linear_export)
        rank, _ = rank_and_world()
        if rank == 0 and recipe is not None:
            from vfm.tracking import tracked_run

            key = run_key or "eval:" + hashlib.sha256(json.dumps([checkpoints, suites, data_map]).encode()).hexdigest()[:16]
            with tracked_run(recipe, stage="eval", run_key=key, parent_run_id=parent_run_id, uri=tracking_uri,
                             run_name=run_name or f"{recipe.id}-eval", extra_tags=tags) as run:
                from vfm.data.manifest import Manifest

                for url in dict.fromkeys(data_map.values()):
                    run.log_dataset(Manifest.load(url), "evaluation")
                results = evaluate_seeds(checkpoints, suites, data_map, claims=claims, run=run, out_json=out, **kwargs)
        else:
            results = evaluate_seeds(checkpoints, suites, data_map, claims=claims, out_json=out, **kwargs)
        if rank == 0:
            from rich.console import Console
            from rich.table import Table

            table = Table("metric", "achieved", "paper claim", title=f"{results.recipe_id}: {', '.join(suites)}")
            for row in summary_rows(results):
                table.add_row(*row)
            Console().print(table)
            print(f"results: {out}")

    @app.command("compare")
    def compare_cmd(
        experiments: Annotated[list[str] | None, typer.Argument(help="Recipe ids or vfm/<id> names (default: all).")] = None,
        tracking_uri: UriOpt = None,
        out: Annotated[Path, typer.Option("--out", help="PNG with curves and eval bars.")] = Path("vfm-compare.png"),
        html: Annotated[Path | None, typer.Option(
            "--html", help="Self-contained HTML report (table + plot); default: the PNG's path with .html.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
        ablation: Annotated[str | None, typer.Option(
            "--ablation", help="MLflow parent run id of a convnext-xl-ablation pipeline run: its grid's table and "
            "top-1 heatmap (kernel × expansion, params and FLOPs per cell) instead.")] = None,
    ) -> None:
        """A table of runs (recipe, stage, datasets, key metrics, claim vs achieved), a PNG and an HTML report,
        from the MLflow server."""
        from vfm.evaluate.compare import collect_runs, render_html, render_png, table_rows

        if ablation:
            _compare_ablation(ablation, tracking_uri, out, as_json)
            return

        rows = collect_runs(list(experiments or []), tracking_uri=tracking_uri)
        table = table_rows(rows)
        if as_json:
            print(json.dumps([dict(zip(table[0], r, strict=True)) for r in table[1:]], indent=2))
        else:
            from rich.console import Console
            from rich.table import Table

            t = Table(*table[0], title="vfm runs")
            for r in table[1:]:
                t.add_row(*r)
            Console(width=200).print(t)
        png = render_png(rows, out)
        print(f"plot: {png}")
        print(f"report: {render_html(rows, png, html or out.with_suffix('.html'))}")


def _compare_ablation(parent_run_id: str, tracking_uri: str | None, out: Path, as_json: bool) -> None:
    from dataclasses import asdict

    from vfm.evaluate.ablation import heatmap, rows_from_mlflow, table
    from vfm.tracking import require_client

    client = require_client(tracking_uri, "vfm compare --ablation reads the run from MLflow")
    rows = rows_from_mlflow(client, parent_run_id)
    if as_json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(table(rows))
    tags = client.get_run(parent_run_id).data.tags
    title = f"{tags.get('vfm.pipeline', 'ablation')} ({tags.get('vfm.profile', 'paper')} profile), run {parent_run_id[:8]}"
    print(f"heatmap: {heatmap(rows, out, title=title)}")


def _recipe_of(export: str, profile: str | None = None, overrides: list[str] | None = None):
    """The recipe an export came from (for MLflow and claims); None for an export of an unknown recipe.
    Reads only `model.json`: the weights (GBs for ViT-g) are loaded once, by the evaluation."""
    from vfm import storage
    from vfm.export import META, ExportMeta
    from vfm.recipes import RecipeError, load_recipe

    url = storage.join(str(export), META)
    if not storage.exists(url):
        raise UserError(f"{export}: not a vfm export (no {META}); pass the `export/` directory a training run wrote")
    meta = ExportMeta(**json.loads(storage.read_bytes(url)))
    try:
        recipe = load_recipe(meta.recipe_id, overrides, profile or meta.extra.get("profile", "paper"))
    except RecipeError:
        return None, {}
    return recipe, recipe.claims.model_dump()


def _init_distributed() -> None:
    """Join the process group when launched by torchrun / a PyTorchJob (WORLD_SIZE > 1)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from vfm.dist import init_distributed

        init_distributed()
