"""`vfm curate RECIPE --dest D`: the recipe's `curate:` block on Ray (vfm.curate.run), its report into MLflow."""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)  # whole lines in a step's log

SOURCE_HELP = ("NAME=KIND:PATH[@WEIGHT] (repeatable): curate these instead of the recipe's sources; KIND is folder, "
               "tar, wds, in22k or openimages (openimages: PATH,IDS_CSV)")


def parse_source(text: str, *, option: str = "--source") -> dict[str, Any]:
    """`web=folder:/data/web@0.5` → a CurateSource's fields."""
    name, sep, rest = text.partition("=")
    kind, sep2, path = rest.partition(":")
    if not sep or not sep2 or not name or not path:
        raise typer.BadParameter(f"{option} {text!r}: expected NAME=KIND:PATH[@WEIGHT], e.g. web=folder:/data/web")
    out: dict[str, Any] = {"name": name, "kind": kind}
    weighted = re.fullmatch(r"(.+)@([0-9]*\.?[0-9]+)", path)
    if weighted:
        path, out["weight"] = weighted.group(1), float(weighted.group(2))
    if kind == "openimages":
        path, _, ids_csv = path.partition(",")
        if not ids_csv:
            raise typer.BadParameter(f"{option} {text!r}: openimages needs PATH,IDS_CSV (the image-id CSV)")
        out["ids_csv"] = ids_csv
    out["path"] = path
    return out


def curate_config(recipe: Any, sources: list[str] | None, eval_sets: list[str] | None) -> Any:
    """The recipe's CurateConfig with `--source` / `--eval-set` replacing its pool / evaluation sets."""
    from pydantic import ValidationError

    from vfm.recipes.schema import CurateConfig

    if recipe.curate is None:
        raise typer.BadParameter(f"recipe {recipe.id} has no `curate:` block; the recipes that curate their "
                                 "pretraining data are meta-dinov2-giant and dinov2-giant")
    data = recipe.curate.model_dump()
    if sources:
        data["sources"] = [parse_source(s) for s in sources]
    if eval_sets:
        data["decontaminate"]["sets"] = [parse_source(s, option="--eval-set") for s in eval_sets]
    try:
        return CurateConfig.model_validate(data)
    except ValidationError as exc:
        raise typer.BadParameter(f"curate settings of {recipe.id}: {exc}") from None


def register(app: typer.Typer) -> None:
    @app.command("curate")
    def curate_cmd(
        recipe_id: Annotated[str, typer.Argument(help="A recipe with a `curate:` block (meta-dinov2-giant, dinov2-giant).")],
        dest: Annotated[str, typer.Option("--dest", help="s3://bucket/prefix or a local directory for the shards.")],
        source: Annotated[list[str] | None, typer.Option("--source", help=SOURCE_HELP)] = None,
        eval_set: Annotated[list[str] | None, typer.Option("--eval-set", help="NAME=KIND:PATH (repeatable): the "
                                                           "decontamination's evaluation sets instead of the recipe's.")] = None,
        raw_root: Annotated[str, typer.Option("--raw-root", help="Where the recipe's relative source paths live "
                                              "(the pipeline's raw-data volume).")] = "/mnt/raw",
        workers: Annotated[int | None, typer.Option("--workers", min=1, help="Ray tasks at once (default: the Ray "
                                                    "cluster's CPUs; locally, this machine's).")] = None,
        ray_address: Annotated[str | None, typer.Option("--ray-address", help="Join this Ray cluster (a RayJob sets "
                                                        "RAY_ADDRESS); default: start Ray on this machine.")] = None,
        endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3 endpoint (else AWS_ENDPOINT_URL_S3).")] = None,
        profile: Annotated[str, typer.Option("--profile", help="Scale profile: paper or smoke.")] = "paper",
        overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: a.b.c=value.")] = None,
        parent_run_id: Annotated[str | None, typer.Option("--parent-run-id", help="MLflow run to nest the report under.")] = None,
    ) -> None:
        """Curate the recipe's image pools into WebDataset shards + manifest (unlabelled), on Ray Data: quality
        filter, decontamination, exact / pHash / embedding dedup; every removed image is recorded with its reason.
        Resumable: rerun the same command after an interruption."""
        from vfm import tracking
        from vfm.curate import ray_session
        from vfm.curate.report import log_report
        from vfm.curate.run import curate, output_digest
        from vfm.recipes import load_recipe

        recipe = load_recipe(recipe_id, overrides, profile)
        cfg = curate_config(recipe, source, eval_set)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with ray_session(workers, ray_address), Progress(TextColumn("{task.description}"), BarColumn(),
                                                         MofNCompleteColumn(), TimeRemainingColumn(),
                                                         console=console) as bar:
            tasks: dict[str, Any] = {}

            def progress(step: str, done: int, total: int) -> None:
                if step not in tasks:
                    tasks[step] = bar.add_task(step, total=total)
                if step == "write":
                    bar.update(tasks[step], total=total, advance=done)
                else:
                    bar.update(tasks[step], total=total, completed=done)

            result = curate(cfg, dest, raw_root=raw_root, workers=workers, endpoint_url=endpoint_url,
                            log=console.print, progress=progress)
        with tracking.tracked_run(recipe, stage="curate", run_key=f"curate/{output_digest(cfg)}",
                                  parent_run_id=parent_run_id, run_name=f"{recipe.id}-curate") as run:
            log_report(result, run)
        m, rep = result.manifest, result.report
        console.print(f"{m.num_samples:,} images in {len(m.shards)} shards, manifest {m.location}")
        for src, s in rep["sources"].items():
            console.print(f"  {src}: {s['images']:,} in, {s['kept']:,} kept")
        for stage, reasons in rep["removed"].items():
            for reason, by_src in reasons.items():
                console.print(f"  removed by {stage}: {sum(by_src.values()):>8,}  {reason}")
