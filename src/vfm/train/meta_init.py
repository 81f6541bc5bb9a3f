"""Deferred initialisation: build the modules on the meta device, shard them, then give each rank its
own shards of exactly the values an eager CPU build produces, never holding the whole model on a host.

Why not torchtitan's `to_empty()` + `init_weights()` (torchtitan/train.py): timm models have no init method
that covers every tensor (ConvNeXt's layer-scale gammas, ViT's tokens and DINOv2's head gain are set in
constructors), and DTensor's sharded random init is CUDA-only and changes with the mesh. So the build is
recorded instead (`record`: a TorchDispatchMode logs every aten op that touches a meta tensor) and replayed
on the host (`materialize`), one storage at a time:

- a storage lives from the op that fully overwrites it to its last use. Contents that nothing reads before
  the next full overwrite (`nn.Linear`'s kaiming init that timm re-initialises) are never kept; their
  random ops still run, on a scratch buffer, so the RNG stream is the eager build's;
- a clone that is never written afterwards (the `deepcopy` of a student into its EMA teacher) is the same
  storage, so a teacher costs no second copy;
- at a module tensor's last use each rank copies its own shard into the sharded (`fully_shard`) tensor, or
  the whole tensor into an unsharded one, and the host copy is freed.

The values do not depend on the device, the mesh or the world size: DDP, FSDP and HSDP start from the same
weights. torchdistx's `deferred_init` (pytorch/torchdistx src/python/torchdistx/deferred_init.py) is the same
idea in C++; it is unmaintained and has no build for torch 2.14, so this is kept here.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

HOST = torch.device("cpu")  # where the build is replayed: the values do not depend on the training device

# in-place ops that replace every element they write without reading it
_OVERWRITES = {torch.ops.aten.uniform_, torch.ops.aten.normal_, torch.ops.aten.fill_, torch.ops.aten.zero_,
               torch.ops.aten.random_, torch.ops.aten.bernoulli_, torch.ops.aten.exponential_,
               torch.ops.aten.geometric_, torch.ops.aten.log_normal_, torch.ops.aten.cauchy_,
               torch.ops.aten.copy_}


@dataclass(frozen=True)
class _Spec:
    """A meta tensor as an op saw it: its storage (kept alive, so its id is never reused) and its layout.
    Not the tensor itself: `module.to(...)` swaps a parameter's `.data`, which would rewrite the history."""

    storage: torch.UntypedStorage
    sid: int  # the StorageImpl: shared by every view of the same memory
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    covers: bool  # dense over its whole storage: an overwrite of it replaces every byte

    @classmethod
    def of(cls, t: Tensor) -> _Spec:
        st = t.untyped_storage()
        dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        return cls(st, st._cdata, t.storage_offset(), tuple(t.size()), tuple(t.stride()), t.dtype,
                   dense and t.numel() * t.element_size() == st.nbytes())

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes()


def _is_meta(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_meta


def _specs(x: Any) -> list[_Spec]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, _Spec)]


@dataclass
class _Op:
    func: Any
    args: tuple
    kwargs: dict
    out: Any
    overwrites: bool = False
    """A recorded Python call (not an aten op) that fills its first argument, e.g. `nn.init.trunc_normal_`."""


# torch.nn.init functions that return early on meta tensors ("sampling is a no-op"): recorded as calls and
# run for real on replay. `_no_grad_trunc_normal_` is what `trunc_normal_` calls (its rejection sampling
# loops on the drawn values, so it could not be recorded op by op anyway).
_SKIPS_META = ("_no_grad_trunc_normal_", "orthogonal_", "dirac_", "sparse_")


class Tape(TorchDispatchMode):
    """The aten ops of a build that touch meta tensors, in order, with each meta tensor as its `_Spec`
    (ops on real tensors run as usual)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op | None] = []
        self.rng_state = torch.get_rng_state()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(_is_meta(x) for x in tree_flatten((args, kwargs, out))[0]):
            spec = lambda x: _Spec.of(x) if _is_meta(x) else x  # noqa: E731
            self.ops.append(_Op(func, tree_map(spec, args), tree_map(spec, kwargs), tree_map(spec, out)))
        return out


@contextmanager
def record() -> Iterator[Tape]:
    """Record what the block builds on the meta device (the caller builds there: `TaskContext.init_device`)."""
    tape = Tape()
    originals = {name: getattr(torch.nn.init, name) for name in _SKIPS_META}

    def recorded(fn):
        def call(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if not _is_meta(tensor):
                return fn(tensor, *args, **kwargs)
            tape.ops.append(_Op(fn, (_Spec.of(tensor), *args), kwargs, None, overwrites=True))
            return tensor
        return call

    for name, fn in originals.items():
        setattr(torch.nn.init, name, recorded(fn))
    try:
        with tape, warnings.catch_warnings():
            # load_state_dict into a meta module: the copy it calls a no-op is exactly what gets recorded
            warnings.filterwarnings("ignore", message=r".*copying from a non-meta parameter")
            yield tape
    finally:
        for name, fn in originals.items():
            setattr(torch.nn.init, name, fn)


@dataclass
class _Target:
    module: nn.Module
    fqn: str
    spec: _Spec  # the meta tensor as built


def targets(modules: Mapping[str, nn.Module]) -> list[_Target]:
    """The meta tensors (parameters and buffers, by name) of `modules`, before sharding replaces them. A module
    is built on meta whole or not at all: one with both kinds would lose its real values to `to_empty`."""
    out = []
    for name, module in modules.items():
        named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
        meta = [fqn for fqn, t in named if t.is_meta]
        if meta and len(meta) < len(named):
            real = sorted({fqn for fqn, _ in named} - set(meta))
            raise ValueError(f"module {name!r} mixes meta and real tensors (real: {real[:5]}); build all of it on "
                             "`TaskContext.init_device`")
        out += [_Target(module, fqn, _Spec.of(t)) for fqn, t in named if t.is_meta]
    return out


def deferred(modules: Mapping[str, nn.Module], wanted: list[_Target]) -> list[nn.Module]:
    """The modules that were built on meta (their `targets`): the ones to `to_empty` and materialise. A module
    the task built for real keeps its values."""
    ids = {id(t.module) for t in wanted}
    return [m for m in modules.values() if id(m) in ids]


@dataclass
class _Plan:
    """Per op index: whether to run it, and which storages die after it (with `final`: extract them first)."""

    skip: set[int] = field(default_factory=set)
    root: dict[int, int] = field(default_factory=dict)
    die_after: dict[int, list[tuple[int, bool]]] = field(default_factory=lambda: defaultdict(list))

    def find(self, sid: int) -> int:
        while sid in self.root:
            sid = self.root[sid]
        return sid


def _tensors(op: _Op) -> tuple[list[tuple[_Spec, bool, bool]], list[_Spec]]:
    """(meta argument, written, fully overwritten) for each argument of `op`, and its meta outputs."""
    if op.overwrites:
        target = op.args[0]
        return [(target, True, target.covers)], []
    written = {a.name for a in op.func._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    names = [a.name for a in op.func._schema.arguments]
    overwrite = op.func.overloadpacket in _OVERWRITES
    ins = []
    for i, a in enumerate(op.args):
        w = i < len(names) and names[i] in written
        ins += [(t, w, w and i == 0 and overwrite and t.covers) for t in _specs(a)]
    for k, a in op.kwargs.items():
        ins += [(t, k in written, False) for t in _specs(a)]
    return ins, _specs(op.out)


def _plan(ops: list[_Op | None]) -> _Plan:
    plan = _Plan()
    parsed = [_tensors(op) if op is not None else ([], []) for op in ops]
    writes: dict[int, list[int]] = defaultdict(list)
    for i, (ins, _) in enumerate(parsed):
        for t, w, _full in ins:
            if w:
                writes[t.sid].append(i)
    # clones that nothing writes afterwards share their source's storage
    for i, op in enumerate(ops):
        if op is None or op.func is not torch.ops.aten.clone.default:
            continue
        (src, _, _), = parsed[i][0]
        dst, = parsed[i][1]
        if (src.covers and dst.covers and src.stride == dst.stride and all(j < i for j in writes[src.sid])
                and not writes[dst.sid]):
            plan.root[dst.sid] = src.sid
            plan.skip.add(i)
    # generations: a storage's life is cut at each full overwrite; each piece dies after its last use
    last: dict[int, int] = {}
    for i, (ins, outs) in enumerate(parsed):
        if i in plan.skip:
            continue
        in_sids = {plan.find(t.sid) for t, _, _ in ins}
        if not any(w for _, w, _ in ins) and outs and all(plan.find(t.sid) in in_sids for t in outs):
            plan.skip.add(i)  # a view: nothing to run, later ops resolve it from the storage
            continue
        for t, _, full in ins:
            s = plan.find(t.sid)
            if full and s in last:
                plan.die_after[last[s]].append((s, False))
            last[s] = i
        for t in outs:
            last[plan.find(t.sid)] = i
    for s, i in last.items():
        plan.die_after[i].append((s, True))
    return plan


class _Host:
    """The replayed storages that are alive, and the peak of their bytes."""

    def __init__(self) -> None:
        self.storages: dict[int, torch.UntypedStorage] = {}
        self.bytes = self.peak = 0

    def view(self, plan: _Plan, t: _Spec) -> Tensor:
        s = plan.find(t.sid)
        if s not in self.storages:  # the start of a generation: a fresh buffer for the overwrite
            self.adopt(s, torch.UntypedStorage(t.nbytes))
        return torch.empty(0, dtype=t.dtype).set_(self.storages[s], t.offset, t.size, t.stride)

    def adopt(self, s: int, storage: torch.UntypedStorage) -> None:
        self.storages[s] = storage
        self.bytes += storage.nbytes()
        self.peak = max(self.peak, self.bytes)

    def free(self, s: int) -> None:
        storage = self.storages.pop(s, None)
        if storage is not None:
            self.bytes -= storage.nbytes()


def _host_args(x: Any) -> Any:
    return HOST if isinstance(x, torch.device) and x.type == "meta" else x


def materialize(tape: Tape, wanted: list[_Target]) -> int:
    """Replay `tape` on the host and copy each target's value into its module's tensor (of the same name,
    after any sharding and `to_empty`). Returns the peak host bytes the replay held."""
    ops, tape.ops = tape.ops, []
    plan = _plan(ops)
    sinks: dict[int, list[_Target]] = defaultdict(list)
    for target in wanted:
        sinks[plan.find(target.spec.sid)].append(target)
    host, done = _Host(), set()
    torch.set_rng_state(tape.rng_state)  # the eager build's stream: its draws happen in its order

    def resolve(x: Any) -> Any:
        return host.view(plan, x) if isinstance(x, _Spec) else _host_args(x)

    with torch.no_grad():
        for i, op in enumerate(ops):
            if i not in plan.skip and op is not None:
                out = op.func(*tree_map(resolve, op.args), **tree_map(resolve, op.kwargs))
                for m, r in zip(tree_flatten(op.out)[0], tree_flatten(out)[0], strict=True):
                    if isinstance(m, _Spec) and plan.find(m.sid) not in host.storages:
                        _adopt_output(host, plan, m, r)
            ops[i] = None  # drop the real tensors the op held (an export's weights) as soon as it ran
            for s, final in plan.die_after.get(i, ()):
                if final:
                    for target in sinks.pop(s, ()):
                        _copy_in(target, host.view(plan, target.spec))
                        done.add(id(target))
                host.free(s)
    missing = [t.fqn for t in wanted if id(t) not in done]
    if missing:
        raise RuntimeError(f"meta init: {len(missing)} tensors were not built inside the recorded block "
                           f"(first: {missing[:5]}); build every module of the task in `Task.build`")
    return host.peak


def _adopt_output(host: _Host, plan: _Plan, meta: _Spec, real: Tensor) -> None:
    s = plan.find(meta.sid)
    if real.storage_offset() == meta.offset and real.stride() == meta.stride \
            and real.untyped_storage().nbytes() == meta.nbytes:
        host.adopt(s, real.untyped_storage())
    else:  # lay it out as the meta kernel did, so later views of the storage line up
        host.view(plan, meta).copy_(real)


def _copy_in(target: _Target, full: Tensor) -> None:
    module, _, name = target.fqn.rpartition(".")
    owner = target.module.get_submodule(module) if module else target.module
    dst = getattr(owner, name)
    if isinstance(dst, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(dst.shape, dst.device_mesh, dst.placements)
        piece = full
        for dim, (size, start) in enumerate(zip(shape, offset, strict=True)):
            piece = piece.narrow(dim, start, size)
        dst.to_local().copy_(piece)
    else:
        dst.data.copy_(full)
