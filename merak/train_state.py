"""A training job's state as one flat ``torch.distributed.checkpoint`` (DCP) state dict, keyed by
the original model's names, and its restoration under any other layout.

Why keys of the original model: a stage's state-dict names already are the user's model's
fully-qualified names (the partitioner keeps them), so a checkpoint keyed by them does not depend
on the cut, the number of stages or the virtual-stage placement: a stage of any later layout asks
DCP for exactly the names it holds. Tied tensors (GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``) are stored under their canonical name; the copies on two stages (and
data-parallel replicas of any tensor) are bitwise equal, so DCP's de-duplication of equal keys
across ranks writes each once.

Why tensor-parallel shards as keys of their own (``...::0/2``, ``...::1/2``) and not DTensors:
Merak shards fused blocks (GPT-2's q|k|v in ``c_attn``) block by block, so a rank's shard is not
one contiguous chunk of the full tensor and cannot be described as a DTensor ``Shard``
placement. Each shard is saved whole by its own rank (DP replicas de-duplicated), together with
its :class:`~merak.runtime.tensor_parallel.layers.ShardSpec`; a reader of another ``tp`` loads
every saved shard of the tensors it holds, rebuilds the full tensor with ``ShardSpec.full`` and
cuts its own shard with ``ShardSpec.local`` (a reader of the same ``tp`` reads only its shard).
Optimizer states shaped like their parameter follow the parameter's sharding.

Key grammar (``::`` never occurs in a module path): ``<section>::<name>::<leaf>::<shard>`` with
section ``model`` (leaf empty), ``optim`` (leaf = the optimizer's state name: ``exp_avg``,
``step``; ``<name>.object`` for a non-tensor state) or ``hparams`` (one parameter's group
hyper-parameters); shard ``t/T`` or empty for a whole tensor. Besides: ``lr_scheduler`` and
``rng::<pp..-dp..-tp..>``. Values that are not tensors are stored as byte tensors (:func:`pack`).
ZeRO-1 needs nothing special: each data-parallel rank writes the states of the parameters it
owns, keyed by name, and a later run's owner of a parameter reads them whatever the partition.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from merak.runtime.memory.zero import local_optimizer
from merak.runtime.tensor_parallel.layers import ShardSpec

__all__ = ["StageTensor", "stage_tensors", "tensor_key", "parse_key", "collect_state", "StateRequests",
           "spec_to_json", "spec_from_json", "pack", "unpack", "leaf_name"]

SEP = "::"
MODEL, OPTIM, HPARAMS = "model", "optim", "hparams"
LR_SCHEDULER = "lr_scheduler"
RNG = "rng"
OBJECT = "object"  # suffix of an optimizer state leaf that is not a tensor (stored packed)


def tensor_key(section: str, name: str, leaf: str = "", shard: tuple[int, int] | None = None) -> str:
    """The DCP key of one tensor (or one parameter's object, for ``hparams``)."""
    return SEP.join((section, name, leaf, "" if shard is None else f"{shard[0]}/{shard[1]}"))


def parse_key(key: str) -> tuple[str, str, str, tuple[int, int] | None] | None:
    """Inverse of :func:`tensor_key`; ``None`` for keys of other kinds (scheduler, RNG)."""
    parts = key.split(SEP)
    if len(parts) != 4:
        return None
    section, name, leaf, shard = parts
    if not shard:
        return section, name, leaf, None
    t, n = shard.split("/")
    return section, name, leaf, (int(t), int(n))


def pack(obj: Any) -> torch.Tensor:
    """A non-tensor value (scheduler state, hyper-parameters, RNG states) as a byte tensor.

    Why not DCP's own object items: they drop entries of some dicts (a ``LambdaLR`` state came
    back without its ``lr_lambdas``), and a byte tensor goes through the same, tested tensor path.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def unpack(data: torch.Tensor) -> Any:
    """Inverse of :func:`pack`."""
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=False)


def rng_key(coord_name: str) -> str:
    return f"{RNG}{SEP}{coord_name}"


def spec_to_json(spec: ShardSpec) -> dict[str, Any]:
    return {"dim": spec.dim, "parts": spec.parts, "blocks": list(spec.blocks)}


def spec_from_json(value: Mapping[str, Any]) -> ShardSpec:
    return ShardSpec(dim=int(value["dim"]), parts=int(value["parts"]), blocks=tuple(value.get("blocks", ())))


@dataclasses.dataclass(frozen=True)
class StageTensor:
    """One tensor a stage holds: its canonical name in the original model, the live (possibly
    tensor-parallel-sharded) tensor, and how it is sharded (``None``: whole)."""

    name: str
    tensor: torch.Tensor
    spec: ShardSpec | None

    def full_shape(self) -> tuple[int, ...]:
        shape = list(self.tensor.shape)
        if self.spec is not None:
            shape[self.spec.dim] *= self.spec.parts
        return tuple(shape)


def stage_tensors(stage: nn.Module) -> list[StageTensor]:
    """The stage's parameters and persistent buffers, each once, under the canonical name of its
    tie group (a stage holding both names of a tied weight lists it once)."""
    canonical = {local: key for key, local in getattr(stage, "tied_parameters", {}).items()}
    canonical.update(getattr(stage, "canonical_names", {}) or {})
    specs: Mapping[str, ShardSpec] = getattr(stage, "tp_param_specs", {}) or {}
    seen: dict[int, int] = {}
    out: list[StageTensor] = []
    for local, tensor in stage.state_dict(keep_vars=True).items():
        name = canonical.get(local, local)
        spec = specs.get(local)
        if id(tensor) in seen:
            index = seen[id(tensor)]
            if local in canonical:  # a tie map's canonical name wins, else the first name (HF's)
                out[index] = dataclasses.replace(out[index], name=name)
            continue
        seen[id(tensor)] = len(out)
        out.append(StageTensor(name, tensor, spec))
    return out


def _shard_of(item: StageTensor, tp_rank: int, value: torch.Tensor) -> tuple[int, int] | None:
    """The shard coordinate of ``value`` (the tensor itself or a state shaped like it)."""
    if item.spec is None or tuple(value.shape) != tuple(item.tensor.shape):
        return None
    return tp_rank, item.spec.parts


def collect_state(stage: nn.Module, tp_rank: int, optimizer: torch.optim.Optimizer | None,
                  lr_scheduler: Any | None, rng: tuple[str, Any] | None) -> dict[str, Any]:
    """This rank's part of the job's state as a flat DCP state dict (tensors are the live ones:
    DCP copies them while writing). ``rng`` is (this rank's coordinate name, its RNG states).
    Every tensor is contiguous (a copy only for the rare one that is not), which lets the loader
    read items straight into their destinations (:mod:`merak.dcp_reader`)."""
    items = stage_tensors(stage)
    state: dict[str, Any] = {}
    for item in items:
        state[tensor_key(MODEL, item.name, shard=_shard_of(item, tp_rank, item.tensor))] = item.tensor.detach().contiguous()
    if optimizer is not None:
        by_id = {id(item.tensor): item for item in items}
        for group in optimizer.param_groups:  # the wrapper's groups: every parameter, current lr
            hyper = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                state[tensor_key(HPARAMS, by_id[id(p)].name)] = pack(hyper)
        for p, values in local_optimizer(optimizer).state.items():
            item = by_id[id(p)]
            for leaf, value in values.items():
                if isinstance(value, torch.Tensor):
                    state[tensor_key(OPTIM, item.name, leaf, _shard_of(item, tp_rank, value))] = value.contiguous()
                else:
                    state[tensor_key(OPTIM, item.name, f"{leaf}.{OBJECT}")] = pack(value)
    if lr_scheduler is not None:
        state[LR_SCHEDULER] = pack(lr_scheduler.state_dict())
    if rng is not None:
        state[rng_key(rng[0])] = pack(rng[1])
    return state


class StateRequests:
    """What one rank asks DCP for when restoring, and how each answer becomes its value.

    ``index`` maps (section, name, leaf) to the saved keys by shard, built from the checkpoint's
    metadata; ``saved_specs`` are the saved tensors' shardings. Each ``want_*`` adds buffers to
    :attr:`buffers` (the DCP load request) and returns a function to call after the load.
    """

    def __init__(self, metadata: Mapping[str, Any], saved_specs: Mapping[str, ShardSpec], tp_rank: int) -> None:
        self.metadata = metadata
        self.saved_specs = saved_specs
        self.tp_rank = tp_rank
        self.buffers: dict[str, Any] = {}
        self.index: dict[tuple[str, str, str], dict[tuple[int, int] | None, str]] = {}
        for key in metadata:
            parsed = parse_key(key)
            if parsed is not None:
                section, name, leaf, shard = parsed
                self.index.setdefault((section, name, leaf), {})[shard] = key

    def has(self, section: str, name: str, leaf: str = "") -> bool:
        return (section, name, leaf) in self.index

    def leaves(self, section: str, name: str) -> list[str]:
        """The saved optimizer-state names of ``name`` (non-tensor ones with their suffix)."""
        return sorted(leaf for s, n, leaf in self.index if s == section and n == name)

    def names(self, section: str) -> set[str]:
        return {n for s, n, _ in self.index if s == section}

    def _buffer(self, key: str) -> torch.Tensor:
        md = self.metadata[key]
        buf = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        self.buffers[key] = buf
        return buf

    def want_object(self, key: str) -> Callable[[], Any]:
        """A value saved with :func:`pack`."""
        buf = self._buffer(key)
        return lambda: unpack(buf)

    def want_tensor(self, section: str, item: StageTensor, leaf: str = "",
                    into: torch.Tensor | None = None) -> Callable[[], Any]:
        """The saved value of ``item`` (or its optimizer state ``leaf``) shaped as this rank holds it.

        Read in place - straight into the live weight, or into ``into`` (an optimizer's current
        state tensor) - when the saved tensor is exactly this rank's (same shape, dtype, shard),
        so a load holds no second copy of the stage or of its optimizer states."""
        dest = item.tensor if section == MODEL else into
        shards = self.index[(section, item.name, leaf)]
        if None in shards:  # saved whole (or a state not shaped like the parameter: ``step``)
            key = shards[None]
            if leaf.endswith(f".{OBJECT}"):
                return self.want_object(key)
            if dest is not None and item.spec is None and self._fits(key, dest):
                return self._in_place(key, dest)
            buf = self._buffer(key)
            return lambda: self._local(item, buf)
        saved = self.saved_specs[item.name]
        if item.spec == saved and (self.tp_rank, saved.parts) in shards:  # same tp: own shard only
            key = shards[(self.tp_rank, saved.parts)]
            if dest is not None and self._fits(key, dest):
                return self._in_place(key, dest)
            buf = self._buffer(key)
            return lambda: buf
        bufs = [self._buffer(shards[(t, saved.parts)]) for t in range(saved.parts)]
        return lambda: self._local(item, saved.full(bufs))

    def _fits(self, key: str, tensor: torch.Tensor) -> bool:
        md = self.metadata[key]
        return tuple(md.size) == tuple(tensor.shape) and md.properties.dtype == tensor.dtype and tensor.is_contiguous()

    def _in_place(self, key: str, tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        """DCP reads straight into ``tensor`` (a live weight or optimizer state): no second copy."""
        target = tensor.detach()
        self.buffers[key] = target
        return lambda: target

    def _local(self, item: StageTensor, full: torch.Tensor) -> torch.Tensor:
        if item.spec is None or tuple(full.shape) != item.full_shape():
            return full
        return item.spec.local(full, self.tp_rank)


def leaf_name(saved_leaf: str) -> str:
    """The optimizer-state name of a saved leaf (without the non-tensor suffix)."""
    return saved_leaf[: -len(OBJECT) - 1] if saved_leaf.endswith(f".{OBJECT}") else saved_leaf
