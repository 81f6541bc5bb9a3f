"""The package's floors, read from the source: which areas may import which (function-level imports
included; imports under `if TYPE_CHECKING:` are types only and do not count), and no import cycle
between modules at import time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# area → areas it must never import: the engine knows no task, the SSL parts know no engine, evaluation
# knows no training, recipes are plain data (their one registry question goes to vfm.tasks' light index)
FORBIDDEN = {
    "vfm.train": ("vfm.ssl", "vfm.tasks", "vfm.trainer", "vfm.plan", "vfm.throughput", "vfm.pipeline"),
    "vfm.ssl": ("vfm.train", "vfm.tasks", "vfm.trainer"),
    "vfm.evaluate": ("vfm.train", "vfm.tasks", "vfm.ssl", "vfm.trainer"),
    "vfm.recipes": ("vfm.train", "vfm.ssl", "vfm.tasks.", "vfm.models", "vfm.data", "vfm.evaluate"),
    "vfm.storage": ("vfm.",),
    "vfm.tasks": ("vfm.trainer", "vfm.plan", "vfm.pipeline", "vfm.launch"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "vfm").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str, *, top_level_only: bool) -> set[str]:
    """vfm modules imported by `path` (resolving relative imports), outside TYPE_CHECKING blocks."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(nodes: list[ast.stmt], nested: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse, nested)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("vfm"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                if base.startswith("vfm"):
                    found.add(base)
                    # `from vfm.x import y` imports the module vfm.x.y when y is one
                    found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
            is_def = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if is_def and top_level_only:
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                child = getattr(node, field, None)
                if isinstance(child, list):
                    visit([c for c in child if isinstance(c, ast.stmt | ast.ExceptHandler)], nested or is_def)

    visit(ast.parse(path.read_text()).body, False)
    return found


MODULES = _modules()


def _within(target: str, area: str) -> bool:
    """`vfm.tasks` covers the package and its modules; `vfm.tasks.` (trailing dot) only its modules."""
    if area.endswith("."):
        return target.startswith(area)
    return target == area or target.startswith(area + ".")


@pytest.mark.parametrize("area", sorted(FORBIDDEN))
def test_no_arrow_into_a_forbidden_area(area):
    bad = []
    for module, path in MODULES.items():
        if module != area and not module.startswith(area + "."):
            continue
        for target in _imports(path, module, top_level_only=False):
            if any(_within(target, f) for f in FORBIDDEN[area]):
                bad.append(f"{module} → {target}")
    assert not bad, "\n".join(bad)


def test_recipes_ask_only_the_task_index():
    """`recipes.derive` asks `vfm.tasks.task_for`; the index module imports no task at import time."""
    assert _imports(MODULES["vfm.tasks"], "vfm.tasks", top_level_only=True) == set()


def test_nothing_at_run_time_imports_the_deploy_checks():
    users = [m for m, p in MODULES.items() if not m.startswith("vfm.deploy")
             and any(t.startswith("vfm.deploy") for t in _imports(p, m, top_level_only=False))]
    assert not users


def test_no_import_cycle_between_modules():
    graph = {m: {t for t in _imports(p, m, top_level_only=True) if t in MODULES and t != m}
             for m, p in MODULES.items()}
    # a package's __init__ runs before its submodules: `from vfm.x import y` with y a module is an edge to it
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)


def test_the_rules_see_real_imports():
    """The scanner finds what the engine does import, so the rules above cannot pass vacuously."""
    loop = _imports(MODULES["vfm.train.loop"], "vfm.train.loop", top_level_only=False)
    assert {"vfm.train.setup", "vfm.train.checkpoint", "vfm.dist"} <= loop
    assert "vfm.recipes.derive" not in loop  # a TYPE_CHECKING import only
    assert "vfm.tasks" in _imports(MODULES["vfm.recipes.derive"], "vfm.recipes.derive", top_level_only=True)
