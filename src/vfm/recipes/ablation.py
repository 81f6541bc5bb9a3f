"""Paper 002's kernel-size × expansion-ratio ablation: the recipe's `ablation:` grid as one recipe per cell.

A cell is the recipe's pretraining stage retargeted by `--set` overrides: the small variant
(`ablation.variant`) built with that cell's depthwise kernel and MLP ratio (vfm.models.create_model), the
IN-1K subset, the ablation's resolution, epochs, per-GPU batch, drop path and GPU count. Overrides and
not a second recipe type, because every step (the digest check, the job's `vfm train` command line, the
evaluator) already resolves a recipe from `recipe_id + overrides`: a cell runs through them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from vfm.recipes.datasets import DATASET_SIZES
from vfm.recipes.errors import RecipeError
from vfm.recipes.schema import Recipe

ABLATION_STAGE = "pretrain"  # each cell trains from scratch on the subset
SUBSET_DATASET = "in1k"


@dataclass(frozen=True)
class Cell:
    kernel_size: int
    mlp_ratio: float
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        """`k7-r4`: short, and valid in job names, MLflow run names and KFP display names."""
        return f"k{self.kernel_size}-r{self.mlp_ratio:g}".replace(".", "p")


def ablation_cells(recipe: Recipe) -> list[Cell]:
    """Every cell of the grid, kernel-major (the order of the report's rows)."""
    ab = recipe.ablation
    if ab is None:
        raise RecipeError(f"recipe {recipe.id} has no `ablation:` block; only convnext-xl declares one")
    cells = []
    for k in ab.kernel_sizes:
        for r in ab.mlp_ratios:
            cells.append(Cell(k, float(r), (
                f"model.timm_name={ab.variant}",
                f"model.kwargs={{kernel_sizes: {k}, mlp_ratio: {float(r)!r}}}",
                f"stages.{ABLATION_STAGE}.data.dataset={SUBSET_DATASET}",
                f"stages.{ABLATION_STAGE}.data.resolution={ab.resolution}",
                f"stages.{ABLATION_STAGE}.epochs={ab.epochs:g}",
                f"stages.{ABLATION_STAGE}.batch.micro_batch={ab.micro_batch}",
                f"stages.{ABLATION_STAGE}.batch.grad_accum=null",  # derived for the cell's GPU count
                f"stages.{ABLATION_STAGE}.drop_path={ab.drop_path:g}",
                f"hardware.gpus={ab.gpus}",
            )))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise RecipeError(f"ablation grid repeats a cell: {names}; list each kernel size and ratio once")
    return cells


def cell_by_name(recipe: Recipe, name: str) -> Cell:
    cells = {c.name: c for c in ablation_cells(recipe)}
    if name not in cells:
        raise RecipeError(f"ablation cell {name!r} is not in the grid of {recipe.id}; cells: {', '.join(cells)}")
    return cells[name]


def subset_size(recipe: Recipe) -> int:
    """The subset's expected size from IN-1K's class sizes (~1,281 per class), for `vfm plan` only: the
    pipeline trains on the sharded subset's real count."""
    assert recipe.ablation is not None
    sub = recipe.ablation.subset
    return round(DATASET_SIZES[SUBSET_DATASET] * sub.num_classes / 1000 * sub.fraction)
