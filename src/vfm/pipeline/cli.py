"""`vfm pipeline compile | run | submit`."""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from vfm.pipeline import config

pipeline_app = typer.Typer(help="KFP pipelines: compile, run locally (kfp.local), submit to a cluster.",
                           no_args_is_help=True)
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: a.b.c=value (repeatable).")]
PIPELINES_DIR = Path("pipelines")


def _ids(pipeline_ids: list[str] | None) -> list[str]:
    from vfm.pipeline.dag import pipeline_ids as all_ids
    from vfm.pipeline.dag import recipe_of

    ids = list(pipeline_ids or all_ids())
    for pid in ids:
        recipe_of(pid)  # unknown ids fail with the recipe loader's "did you mean"
    return ids


@pipeline_app.command("compile")
def compile_cmd(
    recipe_ids: Annotated[list[str] | None, typer.Argument(
        help="Pipeline ids: a recipe's, or convnext-xl-ablation (default: all).")] = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where <id>.yaml goes.")] = PIPELINES_DIR,
    components_image: Annotated[str | None, typer.Option(
        "--components-image", help="Image every step runs in, e.g. <registry>/vfm-components:<tag> "
        "(default: the committed YAML's).")] = None,
    trainer_image: Annotated[str | None, typer.Option(
        "--trainer-image", help="Default of the `image` parameter the training jobs run, e.g. "
        "<registry>/vfm-trainer:<tag>.")] = None,
) -> None:
    """Compile each pipeline (one per recipe, plus the ablation's) to <out-dir>/<id>.yaml (what `kfp run create -f`
    takes)."""
    from vfm.pipeline.dag import compile_pipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    for rid in _ids(recipe_ids):
        print(compile_pipeline(rid, out_dir / f"{rid}.yaml", components_image=components_image,
                               trainer_image=trainer_image))


@pipeline_app.command("run")
def run_cmd(
    recipe_id: str,
    local: Annotated[bool, typer.Option("--local", help="Run the whole DAG on this machine through kfp.local.")] = False,
    profile: Annotated[str, typer.Option("--profile", help="Scale profile: smoke (CPU minutes) or paper.")] = "smoke",
    overrides: SetOpt = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help="Comma list: the last stage's seeds (default: the recipe's).")] = None,
    workdir: Annotated[Path, typer.Option("--workdir", help="KFP outputs, logs, embedded servers' state, local data.")] = Path(".vfm-local"),
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Reuse/make the local digits archives here.")] = None,
    source: Annotated[list[str] | None, typer.Option(
        "--source", help="Your data for a role: ROLE=PATH or ROLE=LAYOUT:PATH (a folder or an official archive), "
        "e.g. pretrain=/data/fall11_whole.tar, val=/data/ILSVRC2012_img_val.tar with "
        "val_labels=/data/LOC_val_solution.csv; roles you leave out get the digits.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Stream every KFP and trainer log line too "
                                          "(they always go to the log file).")] = False,
    serve: Annotated[bool, typer.Option("--serve", help="Keep the embedded MLflow/S3 up after the run "
                                        "(until Ctrl-C) to browse it in the MLflow UI.")] = False,
    launcher: Annotated[str, typer.Option("--launcher", help="The job kind each stage runs as: pytorchjob "
                                          "(training operator v1) or trainjob (Kubeflow Trainer v2), with "
                                          "that operator's environment.")] = "pytorchjob",
) -> None:
    """Run the recipe's pipeline end to end; `--local` is the only mode (use `submit` for a cluster)."""
    from rich.console import Console

    from vfm.errors import UserError
    from vfm.pipeline.local import run_local

    if not local:
        raise UserError("`vfm pipeline run` runs on this machine: add --local (for a cluster: vfm pipeline submit)")
    seed_list = None
    if seeds:
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds {seeds!r}: expected a comma list of integers such as 0,1,2") from None
    console = Console()

    def show(result) -> None:
        console.print(f"\n[bold]{recipe_id}[/] ({profile}): pipeline {result.state} in {result.seconds:.0f} s")
        if result.report:
            console.print(result.report, markup=False, highlight=False)
        # one plain write: a terminal-wrapped URL is not clickable, and print() writes the text and its
        # newline separately, so another thread's output could land between them
        sys.stdout.write(f"MLflow: {result.mlflow_url}\nlogs: {result.log_path}\n")
        sys.stdout.flush()
        if serve and result.embedded_store is not None:
            console.print("serving the embedded MLflow and S3 endpoint; Ctrl-C to stop")
            sys.stdout.flush()  # the address above reaches a pipe (`| tee`, a test) before the wait, not after
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()

    result = run_local(recipe_id, workdir=workdir.resolve(), profile=profile, overrides=list(overrides or []),
                       seeds=seed_list, data_dir=data_dir.resolve() if data_dir else None, while_serving=show,
                       verbose=verbose, sources=list(source or []), launcher=launcher)
    if result.embedded_store is not None and not serve:
        # the embedded servers stopped with the run; runs, params and metrics stay in their SQLite store
        print(f"The embedded MLflow has stopped. Browse the runs with: mlflow ui --backend-store-uri "
              f"sqlite:///{result.embedded_store}  (artifacts lived on the embedded S3 endpoint: rerun with "
              "--serve to browse them too)")
    if result.state != "FINISHED":
        raise SystemExit(1)


@pipeline_app.command("submit")
def submit_cmd(
    recipe_id: str,
    host: Annotated[str, typer.Option("--host", help="KFP API endpoint, e.g. https://kfp.example.com/pipeline.")],
    experiment: Annotated[str | None, typer.Option("--experiment", help="KFP experiment (default: vfm-<id>).")] = None,
    run_name: Annotated[str | None, typer.Option("--run-name")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Pipeline parameter key=value (repeatable).")] = None,
    package: Annotated[Path | None, typer.Option("--package", help="Compiled YAML (default: pipelines/<id>.yaml).")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="KFP namespace (multi-user).")] = None,
    service_account: Annotated[str, typer.Option(
        "--service-account", help="The run's service account: the one manifests/base/rbac.yaml lets create "
        "PyTorchJobs in `vfm`.")] = config.PIPELINE_RUNNER_SERVICE_ACCOUNT,
) -> None:
    """Create a run of the compiled pipeline on a KFP server (kfp.Client)."""
    from vfm.pipeline.submit import submit

    url = submit(recipe_id, host=host, package=package, experiment=experiment, run_name=run_name,
                 params=list(param or []), namespace=namespace, service_account=service_account)
    print(f"run: {url}")


def register(app: typer.Typer) -> None:
    app.add_typer(pipeline_app, name="pipeline")
