"""The hand-off between training and evaluation: a directory with the weights and what built them.

    export/
      weights.pt   # plain state_dict (timm key names), fp32, loadable without vfm's trainer
      model.json   # timm name + kwargs, classes (wnids), eval data config, recipe id/stage/seed

Training writes it (supervised: the classifier; DINOv2: the teacher backbone); evaluation and
fine-tuning read it. Paths may be local or s3:// (copied through the configured S3 endpoint).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from vfm.errors import UserError

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


def save_export(model: nn.Module, meta: ExportMeta, dest: str | Path) -> str:
    """Write weights + meta to a local dir or an s3:// prefix; returns the destination."""
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) if str(dest).startswith("s3://") else Path(dest)
        local.mkdir(parents=True, exist_ok=True)
        torch.save(state, local / WEIGHTS)
        (local / META).write_text(json.dumps(asdict(meta), indent=2))
        if str(dest).startswith("s3://"):
            _s3_put_dir(local, str(dest))
    return str(dest)


def load_export(src: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ExportMeta]:
    import timm

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(src)
        if str(src).startswith("s3://"):
            local = Path(tmp)
            _s3_get_dir(str(src), local)
        meta_path = local / META
        if not meta_path.is_file():
            raise UserError(f"{src}: not a vfm export (no {META}); pass the `export/` directory a training run wrote")
        meta = ExportMeta(**json.loads(meta_path.read_text()))
        state = torch.load(local / WEIGHTS, map_location="cpu", weights_only=True)
    model = timm.create_model(meta.timm_name, pretrained=False, num_classes=meta.num_classes, **meta.kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{src}: weights do not fit {meta.timm_name} {meta.kwargs}: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), meta


def _split(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.rstrip("/")


def _s3_put_dir(local: Path, url: str) -> None:
    from vfm.servers import s3_client

    bucket, prefix = _split(url)
    client = s3_client()
    for path in sorted(local.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def _s3_get_dir(url: str, local: Path) -> None:
    from vfm.servers import s3_client

    bucket, prefix = _split(url)
    client = s3_client()
    for name in (META, WEIGHTS):
        try:
            client.download_file(bucket, f"{prefix}/{name}", str(local / name))
        except Exception as exc:
            raise UserError(f"{url}/{name}: cannot download ({exc}); is this the export prefix of a run?") from None
