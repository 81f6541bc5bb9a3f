"""Wrapping the trained module for data parallelism: DDP, or FSDP2 (`fully_shard` per block, then the root),
over every rank (`fsdp`) or as HSDP on a (replicate, shard) device mesh (`hsdp`), as torchtitan's
`apply_fsdp` (torchtitan/models/llama3/infra/parallelize.py) runs it: bf16 parameters in the all-gathers
and fp32 gradient reduce-scatters (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`).

Speed switches live here too because their order matters: activation checkpointing and per-block
`torch.compile` are applied to the bare module before it is sharded / wrapped (as torchtitan does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

SHARDED = ("fsdp", "hsdp")  # the parallelisms whose parameters are FSDP2 DTensors


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a timm ViT (`blocks`) or ConvNeXt (`stages[i].blocks`): the FSDP2 units."""
    if isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList):
        return list(model.blocks)
    if isinstance(getattr(model, "stages", None), nn.Sequential | nn.ModuleList):
        return [b for stage in model.stages for b in stage.blocks]
    raise ValueError(f"{type(model).__name__} has neither `blocks` nor `stages[i].blocks`; "
                     "vfm shards timm ViTs and ConvNeXts per block")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under a DDP wrapper (FSDP2 shards in place, so it is already bare)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass(frozen=True)
class Sharding:
    """How FSDP2 shards: over `mesh` (None = every rank, 1-D), with `mp` (None = the parameters' dtype)."""

    mesh: DeviceMesh | None = None
    mp: MixedPrecisionPolicy | None = None

    def __call__(self, model: nn.Module) -> nn.Module:
        return shard(model, self)


def sharding(parallelism: str, precision: str, device: torch.device, *, world_size: int,
             shard_size: int | None) -> Sharding:
    """The FSDP2 layout of a stage: `hsdp` builds the (replicate, shard) mesh; bf16 gathers bf16 params and
    reduces fp32 gradients (fp16 keeps autocast + the sharded GradScaler)."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else None
    if parallelism != "hsdp":
        return Sharding(mp=mp)
    size = shard_size or world_size
    if world_size % size:
        raise ValueError(f"hsdp_shard_size={size} does not divide the world size {world_size}; use a divisor "
                         "(the GPUs of one node)")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size // size, size), mesh_dim_names=("replicate", "shard"))
    return Sharding(mesh=mesh, mp=mp)


def shard(model: nn.Module, how: Sharding | None = None) -> nn.Module:
    """FSDP2 in place: one unit per block (its params all-gathered just in time), the rest at the root."""
    how = how or Sharding()
    kw = {"mesh": how.mesh} if how.mesh is not None else {}
    if how.mp is not None:
        kw["mp_policy"] = how.mp
    for block in blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def uses_channels_last(switch: bool | None, family: str, device: torch.device) -> bool:
    """The stage's `channels_last`, or by default ConvNeXt on CUDA (its depthwise convs are faster in NHWC)."""
    return switch if switch is not None else family == "convnext" and device.type == "cuda"


def apply_speed_switches(model: nn.Module, *, activation_checkpointing: bool, compile: bool,
                         channels_last: bool) -> nn.Module:
    if activation_checkpointing:
        model.set_grad_checkpointing(True)  # timm: checkpoint each block's forward
    if channels_last:
        model.to(memory_format=torch.channels_last)  # the task feeds NHWC inputs to match
    if compile:
        # per block, in place: keeps module identity and names for FSDP2 units and checkpoints
        # static shapes: a training step's shapes are fixed (drop_last), and inductor's dynamic-shape path
        # fails on ConvNeXt's blocks in torch 2.14 ("cannot determine truth value of Relational")
        for block in blocks(model):
            block.compile(dynamic=False)
    return model


def wrap(model: nn.Module, parallelism: str, device: torch.device, how: Sharding | None = None) -> nn.Module:
    """DDP wrapper or FSDP2 sharding (`how`) of the module that is trained."""
    if parallelism in ("fsdp", "hsdp"):
        return shard(model, how)
    if parallelism == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    raise ValueError(f"unknown parallelism {parallelism!r}; use ddp, fsdp or hsdp")


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2: skip the reduce-scatter on non-final micro-steps (DDP uses `no_sync()` around backward)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
