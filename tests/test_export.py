"""The training → evaluation hand-off round-trips locally and on the S3 endpoint."""

from __future__ import annotations

import pytest
import torch

from vfm.errors import UserError
from vfm.export import ExportMeta, load_export, save_export
from vfm.models import build_model
from vfm.recipes import load_recipe


@pytest.mark.parametrize("where", ["local", "s3"])
def test_export_round_trip(where, tmp_path, bucket):
    recipe = load_recipe("vit-huge", profile="smoke")
    model = build_model(recipe, "pretrain", num_classes=3)
    kwargs = {k: v for k, v in recipe.model.kwargs.items() if k in ("patch_size", "depth")} | {"img_size": 32}
    meta = ExportMeta(timm_name=recipe.model.timm_name, kwargs=kwargs, num_classes=3, recipe_id=recipe.id,
                      stage="pretrain", resolution=32, wnids=["n1", "n2", "n3"], seed=1, step=12)
    dest = str(tmp_path / "export") if where == "local" else f"s3://{bucket}/run/export"
    save_export(model, meta, dest)
    loaded, got = load_export(dest)
    assert got == meta
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(loaded(x), model(x))


def test_not_an_export_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a vfm export"):
        load_export(tmp_path)
