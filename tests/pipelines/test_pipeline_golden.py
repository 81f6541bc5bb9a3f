"""Every recipe has a pipeline (and convnext-xl its ablation's); recompiling each pipelines/<id>.py reproduces
the committed YAML (except the SDK version line), so the YAML users submit is the code in the repository."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from vfm.pipeline.dag import pipeline_ids
from vfm.recipes import list_recipes

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines"


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        d.pop("sdkVersion", None)
    return docs


def compile_module(py: Path, out: Path) -> Path:
    from kfp import compiler

    spec = importlib.util.spec_from_file_location(f"pipeline_{py.stem.replace('-', '_')}", py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    compiler.Compiler().compile(module.pipeline, str(out))
    return out


def test_one_pipeline_per_recipe_and_per_ablation_grid():
    assert pipeline_ids() == sorted([*list_recipes(), "convnext-xl-ablation"])
    assert sorted(p.stem for p in PIPELINES.glob("*.py")) == pipeline_ids()
    assert sorted(p.stem for p in PIPELINES.glob("*.yaml")) == pipeline_ids()


@pytest.mark.parametrize("recipe_id", pipeline_ids())
def test_compiled_yaml_matches_the_committed_one(recipe_id, tmp_path):
    fresh = compile_module(PIPELINES / f"{recipe_id}.py", tmp_path / f"{recipe_id}.yaml")
    committed = PIPELINES / f"{recipe_id}.yaml"
    assert load_docs(fresh) == load_docs(committed), (
        f"{committed} is stale: run `vfm pipeline compile {recipe_id}` and commit the result")
