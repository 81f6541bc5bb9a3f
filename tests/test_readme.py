"""README.md stays true: its set-up/test blocks are what CI runs, and its main job is a real command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from vfm.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def block(name: str) -> str:
    m = re.search(rf"<!-- ci:{name} -->\s*```bash\n(.*?)```\s*<!-- /ci:{name} -->", README, re.S)
    assert m, f"README.md lacks the ci:{name} block"
    return m.group(1).strip()


def test_ci_runs_the_readme_commands():
    ci = (Path(__file__).resolve().parents[1] / ".ci/run").read_text()
    assert "readme_block install" in ci and "readme_block test" in ci
    assert block("test").startswith(".venv/bin/python -m pytest")


def test_main_job_is_the_local_pipeline_run_and_parses():
    argv = shlex.split(block("main"))
    assert argv[0] == ".venv/bin/vfm" and argv[1:4] == ["pipeline", "run", "vit-huge"] and "--local" in argv
    # the same arguments reach the real command (--help stops before any work is done)
    result = CliRunner().invoke(app, [*argv[1:], "--help"])
    assert result.exit_code == 0, result.output
    for opt in argv[4:]:
        if opt.startswith("--"):
            assert opt in result.output


def test_every_figure_the_readme_shows_is_in_the_repository():
    """docs/*.png are made by the tests from their own runs (the main job, the MLflow UI in Chromium)."""
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert {"docs/main-job.png", "docs/mlflow-runs.png", "docs/mlflow-compare.png"} <= set(figures)
    root = Path(__file__).resolve().parents[1]
    assert all((root / f).is_file() for f in figures), [f for f in figures if not (root / f).is_file()]
