"""The `vfm` command. Each area registers its own commands (`register(app)`); this file holds the
recipe/plan commands and the error policy: user-fixable errors print one message and exit 2."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from vfm.errors import USER_ERRORS

app = typer.Typer(help="vfm: vision foundation model recipes → shards → training → evaluation → MLflow.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipes_app = typer.Typer(help="The seed recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
# piped or redirected: no wrapping at 80 columns (rich's default off a terminal), so lines stay whole
console = Console(soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True)

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: a.b.c=value (repeatable).")]
ProfileOpt = Annotated[str, typer.Option("--profile", help="Scale profile: paper or smoke.")]


def _piped() -> bool:
    """stdout is a pipe or file: print plain text that never wraps, truncates or carries colour codes."""
    return not sys.stdout.isatty()


@recipes_app.command("list")
def recipes_list() -> None:
    """The five seed recipes (tab-separated when piped, so ids can be cut and copied whole)."""
    from vfm.recipes import list_recipes, load_recipe

    header = ("id", "model", "stages", "paper seed", "claims")
    rows = []
    for rid in list_recipes():
        r = load_recipe(rid)
        claims = ", ".join(f"{k}={v}" for k, v in r.claims.model_dump(exclude_none=True).items())
        kw = ",".join(f"{k}={v}" for k, v in r.model.kwargs.items())
        rows.append((rid, r.model.timm_name + (f" ({kw})" if kw else ""), " → ".join(r.stages), r.paper.seed, claims))
    if _piped():
        print("\n".join("\t".join(row) for row in [header, *rows]))
        return
    table = Table(*header)
    table.columns[0].no_wrap = True
    for row in rows:
        table.add_row(*row)
    console.print(table)


@recipes_app.command("show")
def recipes_show(
    recipe_id: str,
    resolved: Annotated[bool, typer.Option("--resolved", help="After profile, overrides and defaults.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML (implies --resolved).")] = False,
    overrides: SetOpt = None,
    profile: ProfileOpt = "paper",
) -> None:
    """Print a recipe as YAML: the seed as written, or `--resolved` with every default filled in.

    Written straight to stdout, never through rich: `vfm recipes show ID --resolved > r.yaml` is valid YAML."""
    from vfm.recipes import load_recipe, recipe_dict

    recipe = load_recipe(recipe_id, overrides, profile)  # validates even when showing the raw seed
    if as_json:
        sys.stdout.write(json.dumps(recipe.model_dump(mode="json"), indent=2) + "\n")
        return
    data = recipe.model_dump(mode="json") if resolved or overrides or profile != "paper" else recipe_dict(recipe_id)
    sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=10**6))


@app.command("plan")
def plan_cmd(
    recipe_id: str,
    gpus: Annotated[int | None, typer.Option("--gpus", help="Plan for this many GPUs instead.")] = None,
    mfu: Annotated[float, typer.Option("--mfu", help="Model FLOP utilisation to assume.")] = 0.4,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    overrides: SetOpt = None,
    profile: ProfileOpt = "paper",
    ablation: Annotated[bool, typer.Option("--ablation", help="Each cell of the recipe's ablation grid instead: "
                                           "params, FLOPs, GPU-hours (paper 002).")] = False,
) -> None:
    """Derived numbers of a recipe: world size, batch arithmetic, steps, params, FLOPs, GPU-hours, memory."""
    from vfm.plan import plan
    from vfm.recipes import load_recipe

    sets = list(overrides or [])
    if ablation:
        if gpus is not None:
            sets.insert(0, f"ablation.gpus={gpus}")
        _print_ablation_plan(recipe_id, sets, profile, mfu, as_json)
        return
    if gpus is not None:
        sets.insert(0, f"hardware.gpus={gpus}")
    p = plan(load_recipe(recipe_id, sets, profile), mfu=mfu)
    if as_json:
        print(json.dumps(p.to_dict(), indent=2))
        return
    console.print(f"[bold]{p.recipe}[/] ({p.profile}): {p.gpus}× {p.gpu} = {p.nodes} node(s) × "
                  f"{min(p.gpus, p.gpus_per_node)} GPUs, MFU {p.mfu:.0%}")
    table = Table("", *[s.stage for s in p.stages])

    def row(label: str, fmt) -> None:
        table.add_row(label, *[fmt(s) for s in p.stages])

    row("dataset @ resolution", lambda s: f"{s.dataset} @ {s.resolution}px")
    row("samples / epoch", lambda s: f"{s.samples_per_epoch:,}")
    row("micro × accum × world", lambda s: f"{s.micro_batch} × {s.grad_accum} × {s.world_size} = {s.global_batch:,}")
    row("steps / epoch", lambda s: f"{s.steps_per_epoch:,}")
    row("total steps (warmup)", lambda s: f"{s.total_steps:,} ({s.warmup_steps:,})")
    row("peak lr", lambda s: f"{s.peak_lr:.3g}")
    row("params", lambda s: f"{s.params / 1e6:,.1f} M")
    row("fwd GFLOP / image", lambda s: f"{s.forward_gflops_per_image:,.1f}")
    row("train GFLOP / sample", lambda s: f"{s.train_gflops_per_sample:,.1f}")
    row("train FLOPs", lambda s: f"{s.train_flops:.3g}")
    row("GPU-hours", lambda s: "n/a" if s.gpu_hours is None else f"{s.gpu_hours:,.0f}")
    row("wall-clock", lambda s: "n/a" if s.wall_clock_hours is None else f"{s.wall_clock_hours / 24:,.2f} days")
    row("memory / GPU", lambda s: f"{s.memory_gb['total_gb']:.1f} GB "
        f"(states {s.memory_gb['weights_grads_adamw_gb']:.1f} + act {s.memory_gb['activations_gb']:.1f})")
    row("data shards (1 GB)", lambda s: f"{s.shards:,}")
    row("reader slots", lambda s: f"{s.reader_slots:,} × {s.samples_per_epoch // max(1, s.reader_slots):,} samples")
    console.print(table)
    console.print("[bold]the paper against itself[/]")
    for c in p.checks:
        mark = {"ok": "[green]ok[/]", "flag": "[yellow]flag[/]", "info": "[cyan]info[/]"}[c.status]
        console.print(f"  {mark} {c.name}: ", end="")
        console.print(c.detail, markup=False, highlight=False)
    for s in p.stages:
        if (s.executed_micro_batch, s.executed_grad_accum) != (s.micro_batch, s.grad_accum) and s.executed_micro_batch:
            console.print(f"[bold]executed plan[/] {s.stage}: {s.world_size} × micro-batch {s.executed_micro_batch} × "
                          f"accumulation {s.executed_grad_accum} = {s.global_batch:,}")
    if p.params_claim_millions is not None:
        console.print(f"params: paper {p.params_claim_millions:g} M, counted {p.params_counted_millions:,.1f} M")
    if p.total_wall_clock_days is not None:
        claim = f" (paper: {p.claimed_days:g} days)" if p.claimed_days else ""
        console.print(f"total: {p.total_gpu_hours:,.0f} GPU-hours, {p.total_wall_clock_days:.2f} days{claim}")
    for w in p.warnings:
        console.print("[yellow]warning:[/] ", end="")
        console.print(w, markup=False, highlight=False)
    for n in p.notes:
        console.print(n, markup=False, highlight=False)


def _print_ablation_plan(recipe_id: str, sets: list[str], profile: str, mfu: float, as_json: bool) -> None:
    from dataclasses import asdict

    from vfm.plan import plan_ablation

    cells = plan_ablation(recipe_id, sets, profile, mfu)
    if as_json:
        print(json.dumps([asdict(c) for c in cells], indent=2))
        return
    table = Table("cell", "kernel", "MLP ratio", "params (M)", "fwd GFLOP / image", "samples / epoch", "steps",
                  "GPUs", "GPU-hours", title=f"{recipe_id} ablation ({profile}), MFU {mfu:.0%}")
    for c in cells:
        table.add_row(c.cell, str(c.kernel_size), f"{c.mlp_ratio:g}", f"{c.params / 1e6:,.2f}",
                      f"{c.forward_gflops_per_image:,.3f}", f"{c.samples_per_epoch:,}", f"{c.total_steps:,}",
                      str(c.gpus), "n/a" if c.gpu_hours is None else f"{c.gpu_hours:,.1f}")
    console.print(table)
    if all(c.gpu_hours is not None for c in cells):
        console.print(f"total: {sum(c.gpu_hours or 0 for c in cells):,.1f} GPU-hours over {len(cells)} cells")


# each area's commands; a module listed here exposes `register(app)`
_AREAS: list[str] = [
    "vfm.data.cli",
    "vfm.curate.cli",
    "vfm.evaluate.cli",
    "vfm.trainer",
    "vfm.pipeline.cli",
    "vfm.deploy.cli",
    "vfm.registry",
]


def _register_areas() -> None:
    for name in _AREAS:
        importlib.import_module(name).register(app)


_register_areas()


def main() -> None:
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(n) comes back as its return value
    except USER_ERRORS as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)
