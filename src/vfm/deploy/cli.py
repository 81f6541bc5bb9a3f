"""`vfm preflight RECIPE --overlay h100 [--context CTX]`: check a deployment before booking GPUs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vfm.errors import UserError

MANIFESTS = Path("manifests")


def _params(items: list[str] | None) -> dict[str, object]:
    import json

    out: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--param {item!r}: use NAME=VALUE, e.g. namespace=vfm")
        try:
            out[key] = json.loads(value) if value[:1] and value[0] in "[{" else value
        except ValueError:
            raise UserError(f"--param {item!r}: a list value must be JSON, e.g. seeds=[0,1]") from None
    return out


def _byo(items: list[str] | None) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for item in items or []:
        parts = item.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UserError(f"--byo {item!r}: use KIND/NAMESPACE/NAME or KIND/NAME (cluster-scoped), "
                                     "e.g. PersistentVolumeClaim/kubeflow/my-archives")
        kind, *ns, name = parts
        out.append({"kind": kind, "metadata": {"name": name, **({"namespace": ns[0]} if ns else {})}})
    return out


def preflight_cmd(
    recipe_id: Annotated[str, typer.Argument(help="Recipe id, e.g. vit-huge.")],
    overlay: Annotated[str, typer.Option("--overlay", help="An overlay under manifests/overlays (h100, local) or "
                                         "the path of a kustomization.")] = "h100",
    package: Annotated[Path | None, typer.Option("--package", help="A compiled pipeline YAML (default: compile "
                                                 "the recipe's now).")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="A pipeline parameter as the run will set it, "
                                                    "NAME=VALUE (repeatable), e.g. kueue_queue=vfm-h100.")] = None,
    kfp_namespace: Annotated[str, typer.Option("--kfp-namespace", help="Where KFP runs the pipeline's pods.")] = "kubeflow",
    runner: Annotated[str, typer.Option("--runner", help="The service account the run uses, in --kfp-namespace.")] = "vfm-pipeline-runner",
    byo: Annotated[list[str] | None, typer.Option("--byo", help="An object you create outside the overlay, "
                                                  "KIND/NAMESPACE/NAME (repeatable).")] = None,
    components_image: Annotated[str | None, typer.Option("--components-image", help="The components image you "
                                                         "built: every step must run it.")] = None,
    trainer_image: Annotated[str | None, typer.Option("--trainer-image", help="The trainer image you built: "
                                                      "the jobs must run it (default: the overlay's).")] = None,
    context: Annotated[str | None, typer.Option("--context", help="Also check this kubeconfig context's cluster "
                                                "(live).")] = None,
    kubeconfig: Annotated[Path | None, typer.Option("--kubeconfig", help="Kubeconfig file (default: $KUBECONFIG, "
                                                    "~/.kube/config).")] = None,
    mlflow_uri: Annotated[str | None, typer.Option("--mlflow-uri", help="Live: MLflow as this machine reaches it "
                                                   "(e.g. a port-forward); default: the mlflow_uri parameter.")] = None,
    s3_endpoint: Annotated[str | None, typer.Option("--s3-endpoint", help="Live: the S3 endpoint as this machine "
                                                    "reaches it; default: the s3_endpoint parameter.")] = None,
) -> None:
    """Render the overlay, compile the pipeline, build its jobs at paper scale and check that every reference
    resolves and every pod has what its work needs (and, with --context, the cluster). Exit 2 on a problem."""
    from rich.console import Console

    from vfm.deploy import preflight as pf

    path = Path(overlay) if "/" in overlay or Path(overlay).is_dir() else MANIFESTS / "overlays" / overlay
    if not (path / "kustomization.yaml").is_file():
        raise UserError(f"--overlay {overlay}: no kustomization.yaml in {path}; use h100, local or a path")
    plan, objects, template = pf.offline_plan(recipe_id, path, package=package, params=_params(param),
                                              kfp_namespace=kfp_namespace, runner=runner, byo=_byo(byo))
    findings = pf.check_offline(plan, objects, template, components_image, trainer_image)
    where = f"overlay {path}"
    if context is not None:
        from kubernetes import client, config

        try:
            config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None, context=context or None)
        except config.ConfigException as exc:
            raise UserError(f"--context {context}: cannot load it from {kubeconfig or 'the kubeconfig'} ({exc}); "
                            "list contexts with `kubectl config get-contexts`") from None
        findings += pf.check_live(plan, client.ApiClient(), mlflow_uri=mlflow_uri, s3_endpoint=s3_endpoint)
        where += f" and cluster {context or '(current context)'}"
    console = Console(highlight=False, soft_wrap=True)  # one finding per line group: greppable
    console.print(f"preflight {recipe_id} ({plan.params.get('profile')} profile) against {where}: "
                  f"{len(plan.tasks)} pipeline tasks, {len(plan.jobs)} jobs "
                  f"({', '.join(f'{j.what}: {j.pods} pods' for j in plan.jobs)})")
    for text in pf.grouped(findings):
        console.print(text, markup=False, soft_wrap=True)
    if findings:
        console.print(f"[red]{len(findings)} problem(s)[/]; fix them before submitting")
        raise typer.Exit(2)
    console.print(f"[green]ok[/]: {', '.join(pf.OFFLINE_CHECKS + (('live',) if context is not None else ()))}")


def register(app: typer.Typer) -> None:
    app.command("preflight")(preflight_cmd)
