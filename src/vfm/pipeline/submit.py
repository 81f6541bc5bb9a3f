"""`vfm pipeline submit ID --host URL`: a run of the committed compiled pipeline via `kfp.Client`.

The Python client rather than `kfp run create` because only the client exposes the service account
(and the client accepts the compiled .yaml directly). See kubeflow/pipelines tag sdk-2.17.0-1:
sdk/python/kfp/cli/run.py (`create` has no service-account option) and sdk/python/kfp/client/client.py.
"""

from __future__ import annotations

from pathlib import Path

from vfm.errors import UserError


def parse_params(items: list[str]) -> dict[str, object]:
    """key=value → {key: value}, the value parsed as YAML (numbers, lists such as [0,1,2], booleans)."""
    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--param {item!r}: expected KEY=VALUE, e.g. profile=smoke or seeds=[0,1]")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def submit(recipe_id: str, *, host: str, package: Path | None = None, experiment: str | None = None,
           run_name: str | None = None, params: list[str] | None = None, namespace: str | None = None,
           service_account: str | None = None) -> str:
    import kfp

    package = package or Path("pipelines") / f"{recipe_id}.yaml"
    if not package.is_file():
        raise UserError(f"{package} not found: run `vfm pipeline compile {recipe_id}` (or pass --package)")
    client = kfp.Client(host=host, namespace=namespace)
    result = client.create_run_from_pipeline_package(
        str(package), arguments=parse_params(list(params or [])), run_name=run_name,
        experiment_name=experiment or f"vfm-{recipe_id}", namespace=namespace, service_account=service_account)
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"
