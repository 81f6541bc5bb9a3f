"""The five seed recipes as typed data, `--set` overrides and scale profiles.

    load_recipe("vit-huge", overrides=["stages.pretrain.batch.micro_batch=16"], profile="smoke")

Order of application: seed YAML → scale profile → overrides → validation (types, batch arithmetic,
timm model name). Every failure is a `RecipeError` whose message names the field and the fix.
"""

from __future__ import annotations

import difflib
from functools import cache
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vfm.recipes.errors import RecipeError
from vfm.recipes.profiles import PROFILES, apply_profile
from vfm.recipes.schema import Recipe

__all__ = ["Recipe", "RecipeError", "PROFILES", "list_recipes", "load_recipe", "recipe_dict", "flatten"]

_SEEDS = resources.files("vfm.recipes") / "seeds"


def list_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _SEEDS.iterdir() if p.name.endswith(".yaml"))


@cache
def _seed_text(recipe_id: str) -> str:
    path = _SEEDS / f"{recipe_id}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(recipe_id, list_recipes(), n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise RecipeError(f"unknown recipe `{recipe_id}`; {hint}known: {', '.join(list_recipes())}")
    return path.read_text()


def recipe_dict(recipe_id: str) -> dict[str, Any]:
    """The seed as plain data (before profile and overrides)."""
    return yaml.safe_load(_seed_text(recipe_id))


def load_recipe(recipe_id: str, overrides: list[str] | None = None, profile: str = "paper") -> Recipe:
    data = recipe_dict(recipe_id)
    if profile not in PROFILES:
        raise RecipeError(f"unknown profile `{profile}`; choose one of: {', '.join(PROFILES)}")
    data = apply_profile(data, profile)
    for item in overrides or []:
        apply_override(data, item)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_explain(exc)) from None
    _check_model_name(recipe)
    return recipe


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in place; the value is parsed as YAML (numbers, lists, booleans, null)."""
    if "=" not in item:
        raise RecipeError(f"--set `{item}`: expected FIELD=VALUE, e.g. stages.pretrain.batch.micro_batch=16")
    path, raw = item.split("=", 1)
    keys = path.strip().split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {path}: cannot parse value `{raw}`: {exc}") from None
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        nxt = node.get(key) if isinstance(node, dict) else None
        if nxt is None:
            nxt = {}
            node[key] = nxt
        if not isinstance(nxt, dict):
            raise RecipeError(f"--set {path}: `{'.'.join(keys[: depth + 1])}` is a value, not a section")
        node = nxt
    node[keys[-1]] = value
    # a stage's length is `epochs` or `steps`: setting one replaces the other (e.g. steps=4 on smoke's epochs)
    duration = {"epochs": "steps", "steps": "epochs"}
    if len(keys) == 3 and keys[0] == "stages" and keys[2] in duration and value is not None:
        node.pop(duration[keys[2]], None)


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parent = _fields_at(Recipe, [str(p) for p in err["loc"][:-1]])
            close = difflib.get_close_matches(str(err["loc"][-1]), parent, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"valid fields: {', '.join(parent)}"
            lines.append(f"unknown field `{loc}`; {hint}")
        elif err["type"] == "value_error":
            where = f"{loc}: " if loc else ""
            lines.append(f"{where}{err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"field `{loc}`: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    """Field names of the sub-model at `path` (for 'did you mean' hints)."""
    current: Any = model
    for key in path:
        if isinstance(current, type) and issubclass(current, BaseModel) and key in current.model_fields:
            current = current.model_fields[key].annotation
        current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _unwrap(tp: Any) -> Any:
    """Optional[X] / dict[str, X] → X, so the walk continues into nested models."""
    for arg in getattr(tp, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return tp


def _check_model_name(recipe: Recipe) -> None:
    import timm

    names = {"model.timm_name": recipe.model.timm_name}
    if recipe.ablation is not None:
        names["ablation.variant"] = recipe.ablation.variant
    for field_path, name in names.items():
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
            raise RecipeError(f"field `{field_path}`: unknown timm model `{name}`{hint}")
    if recipe.ablation is not None and not recipe.ablation.variant.startswith("convnext"):
        raise RecipeError(f"field `ablation.variant`: `{recipe.ablation.variant}` is not a ConvNeXt; the grid sets "
                          "timm ConvNeXt's kernel_sizes and mlp_ratio (e.g. convnext_tiny)")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict/model → {'a.b.c': value}, for MLflow params and `--resolved` views."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, val in obj.items():
            out.update(flatten(val, f"{prefix}{key}."))
        if not obj and prefix:
            out[prefix[:-1]] = {}
    else:
        out[prefix[:-1]] = obj
    return out
