"""The hand-off between training and evaluation: a directory with the weights and what built them.

    export/
      weights.pt   # plain state_dict (timm key names), fp32, loadable without vfm's trainer
      model.json   # timm name + kwargs, classes (wnids), eval data config, recipe id/stage/seed

Training writes it (supervised: the classifier; DINOv2: the teacher backbone); evaluation and
fine-tuning read it. Paths may be local or s3:// (copied through the configured S3 endpoint).
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vfm import storage
from vfm.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS = "weights.pt"
META = "model.json"


@dataclass
class ExportMeta:
    timm_name: str
    kwargs: dict
    num_classes: int
    recipe_id: str
    stage: str
    resolution: int
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    wnids: list[str] = field(default_factory=list)
    """Class list of the head (index = position); empty for a headless backbone."""
    seed: int | None = None
    step: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # JSON has no tuples: a loaded meta must equal the one that was saved
        self.mean, self.std = tuple(self.mean), tuple(self.std)


def save_export(model: nn.Module, meta: ExportMeta, dest: str | Path) -> str:
    """Write weights + meta to a local dir or an s3:// prefix; returns the destination."""
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / WEIGHTS)
        (Path(tmp) / META).write_text(json.dumps(asdict(meta), indent=2))
        # weights first, meta last: a reader that finds model.json finds complete weights
        for name in (WEIGHTS, META):
            storage.upload_file(Path(tmp) / name, storage.join(str(dest), name))
    return str(dest)


class _FullState(nn.Module):
    """Presents an already gathered state dict through `state_dict()` for `save_export`."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._full = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self._full


def export_trained(module: nn.Module, meta: ExportMeta, dest: str, *, is_main: bool, run: Any = None) -> str | None:
    """The end of a training run: gather `module`'s full state and write the export (rank 0).

    Collective: every rank takes part in gathering sharded (DTensor) weights; only rank 0 receives them,
    in CPU memory, so a sharded ViT-g is never materialised on every GPU. With a tracked `run`
    (vfm.tracking.TrackedRun) the export is also logged as its `export` artifact. Returns `dest` on rank 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    view = _FullState(full)
    save_export(view, meta, dest)  # the product first: an MLflow outage must not cost the trained weights
    log.info("exported %s (step %d) to %s", meta.timm_name, meta.step, dest)
    if run is not None and run.enabled:
        with tempfile.TemporaryDirectory() as tmp:
            save_export(view, meta, Path(tmp))
            try:
                run.log_artifact(tmp, "export")
            except Exception as exc:  # the export is at `dest`; only its copy in MLflow is missing
                log.warning("the export is at %s but could not be logged to MLflow run %s: %s", dest, run.run_id, exc)
    return dest


def load_export(src: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ExportMeta]:
    from vfm.models import create_model

    meta_url, weights_url = storage.join(str(src), META), storage.join(str(src), WEIGHTS)
    if not storage.exists(meta_url):
        raise UserError(f"{src}: not a vfm export (no {META}); pass the `export/` directory a training run wrote")
    meta = ExportMeta(**json.loads(storage.read_bytes(meta_url)))
    state = torch.load(io.BytesIO(storage.read_bytes(weights_url)), map_location="cpu", weights_only=True)
    model = create_model(meta.timm_name, num_classes=meta.num_classes, **meta.kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{src}: weights do not fit {meta.timm_name} {meta.kwargs}: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), meta
