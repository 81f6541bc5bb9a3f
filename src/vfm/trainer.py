"""The trainer process: `vfm train RECIPE --stage pretrain|finetune|<downstream> --data MANIFEST --out DIR|s3://...`,
also `python -m vfm.trainer` (what `vfm.train.torchrun` starts on every rank of a PyTorchJob).

It picks the stage's task (`vfm.tasks.task_for`), resolves the stage's numbers for this world size and
data once (`vfm.recipes.derive.resolve_stage`) and hands both to the loop (`vfm.train.loop.train`).
Started once per process by torchrun (or directly, as a world of one). Exit codes: 0 done; 143 stopped
by SIGTERM after saving a checkpoint (retryable: the restarted pod resumes); 2 user-fixable input
error; 1 anything else, including a NaN/inf loss (not retryable).
"""

from __future__ import annotations

from typing import Annotated

import typer

# defined here, not imported from vfm.cli: `python -m vfm.trainer` must not import the whole CLI (which
# imports this module back while registering areas)
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: a.b.c=value (repeatable).")]
ProfileOpt = Annotated[str, typer.Option("--profile", help="Scale profile: paper or smoke.")]


def train_command(
    recipe_id: Annotated[str, typer.Argument(help="Recipe id, e.g. vit-huge, convnext-xl.")],
    stage: Annotated[str, typer.Option("--stage", help="pretrain, finetune, or a downstream stage "
                                                       "(ade20k, coco).")],
    data: Annotated[str, typer.Option("--data", help="Training manifest: path or s3:// URL (vfm shard output).")],
    out: Annotated[str, typer.Option("--out", help="Run directory or s3:// prefix: checkpoints/ and export/.")],
    init: Annotated[str | None, typer.Option("--init", help="Export directory to fine-tune from.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed (default: the stage's first seed).")] = None,
    profile: ProfileOpt = "paper",
    overrides: SetOpt = None,
    run_key: Annotated[str | None, typer.Option("--run-key", help="MLflow run key (restarts continue the run).")] = None,
    parent_run_id: Annotated[str | None, typer.Option("--parent-run-id", help="MLflow parent run.")] = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="MLflow run name (default: "
                                                 "<recipe>-<stage>-seed<seed>).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="MLflow tag KEY=VALUE (repeatable).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1,
                                                  help="Stop after N updates (schedule unchanged).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=0, help="Data loader worker processes per rank "
                                                "(default: the stage's data.workers, else 0).")] = None,
    head_from_wnids: Annotated[bool, typer.Option("--head-from-wnids",
                                                  help="Copy head rows by wnid from the --init export.")] = False,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic kernels.")] = False,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Log metrics every N updates.")] = 10,
    peak_tflops: Annotated[float | None, typer.Option("--peak-tflops",
                                                      help="Per-device peak for MFU (default: hardware.gpu).")] = None,
    knn_train: Annotated[str | None, typer.Option("--knn-train", help="DINOv2: labelled manifest, k-NN reference "
                                                  "set for the teacher every eval.knn_every_steps.")] = None,
    knn_val: Annotated[str | None, typer.Option("--knn-val", help="DINOv2: labelled manifest, k-NN queries.")] = None,
    system_metrics: Annotated[bool | None, typer.Option(
        "--system-metrics/--no-system-metrics", help="MLflow system metrics (CPU, memory, GPU) from one rank per "
        "node (default: on, off for the smoke profile; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING also sets it).")] = None,
) -> None:
    """Train a recipe stage (DDP/FSDP2, checkpoints, resume, MLflow): supervised, DINOv2 self-supervised
    pretraining for recipes with `ssl` (same loop; the teacher backbone is exported), or a downstream dense stage
    (segmentation / detection from the --init export)."""
    from vfm.dist import init_distributed, shutdown
    from vfm.errors import UserError
    from vfm.recipes import load_recipe
    from vfm.recipes.derive import resolve_stage
    from vfm.tasks import task_for
    from vfm.tracking import parse_tags
    from vfm.train.loop import RunSpec, train

    tags = parse_tags(tag)
    recipe = load_recipe(recipe_id, overrides, profile)
    if stage not in recipe.stage_names:
        raise UserError(f"recipe {recipe_id} has no stage `{stage}`; it has: {', '.join(recipe.stage_names)}")
    spec = task_for(recipe, stage)
    if workers is None:
        workers = recipe.stage(stage).data.workers or 0
    if spec.name == "dinov2":
        task = spec.task_class()(data, num_workers=workers, knn_train=knn_train, knn_val=knn_val)
    elif spec.name == "dense":
        if knn_train or knn_val or head_from_wnids:
            raise UserError(f"--knn-train/--knn-val/--head-from-wnids do not apply to the downstream stage {stage}")
        task = spec.task_class()(data, num_workers=workers)
        if not task.manifest.shards:
            raise UserError(f"{data}: the manifest lists no shards; reshard the dataset with `vfm shard`")
    else:
        if knn_train or knn_val:
            raise UserError("--knn-train/--knn-val apply to DINOv2 pretraining only (recipes with `ssl`)")
        task = spec.task_class()(data, num_workers=workers, head_from_wnids=head_from_wnids)
        # a missing or empty manifest fails here, before any rank joins the process group
        if not task.manifest.shards:
            raise UserError(f"{data}: the manifest lists no shards; reshard the dataset with `vfm shard`")
    try:
        info = init_distributed()
        classes = len(task.manifest.classes) if spec.name == "supervised" else None
        resolved = resolve_stage(recipe, stage, info.world_size, task.num_samples, num_classes=classes)
        st = resolved.config
        train(task, RunSpec(stage=resolved, out=out, seed=st.seeds[0] if seed is None else seed, init=init,
                            max_steps=max_steps, run_key=run_key, parent_run_id=parent_run_id, run_name=run_name,
                            tags=tags,
                            deterministic=deterministic, log_every=log_every,
                            peak_flops=peak_tflops * 1e12 if peak_tflops else None, system_metrics=system_metrics))
    finally:
        shutdown()  # a clean exit of the process group (also after SIGTERM's SystemExit)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)


def main() -> None:
    """`python -m vfm.trainer ...`: the same command and error policy as `vfm train`, without the other areas."""
    import sys

    from vfm.errors import USER_ERRORS
    from vfm.train.loop import TrainingDiverged

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(train_command)
    try:
        app(standalone_mode=False)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
