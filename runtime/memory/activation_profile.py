"""Which tensors autograd keeps for the backward, per graph node and per layer, found on meta.

Why measure instead of using formulas: activation memory is what autograd *saves*, and that
depends on each op's backward (``tanh`` saves its output, ``matmul`` its inputs, a dropout its
mask), on views sharing storage, and on values saved by several ops. Formulas such as
"34·s·b·h bytes per layer" only hold for one model family. So the traced graph is run forward
once on the meta device, with parameters that require grad, under
:func:`torch.autograd.graph.saved_tensors_hooks`; each saved tensor is attributed to the node
that was running when autograd saved it, and identified by its *storage*, so a tensor saved by
two ops, or saved once as a view and once whole, counts once. Parameters (and views of them,
such as the transposed weight a linear layer saves) are not activations and are left out.

Two things the meta device does not do as a GPU (or CPU) run would, emulated here:

* ``scaled_dot_product_attention`` on meta falls back to the math kernel, which saves the
  ``S x S`` score matrix. Fused kernels (flash / memory-efficient on GPUs, flash on CPU) save
  ``q``, ``k``, ``v``, the mask, the output and a float32 log-sum-exp of ``B x H x S``; that is
  what is counted.
* Autocast has no meta kernels. With ``precision="bf16"|"fp16"`` a small torch-function mode
  applies CUDA autocast's casting rules (matmul-like ops run in low precision, norms, softmax,
  reductions and losses in float32, everything else in its inputs' dtype); the casts are
  recorded by autograd as under real autocast, so the low-precision copy of a weight that a
  linear layer saves is counted per micro-batch, as it is in reality (fp32 master weights).

:class:`SavedTensorCounter` counts the same thing on a real run (same storage deduplication,
same exclusion of parameters); the tests compare the two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import weakref
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from merak.partitioner.fusion import fused_copy
from merak.partitioner.meta import meta_like
from merak.partitioner.proxy_graph import PARAM, ProxyGraph
from merak.partitioner.tracer import resolve_path, run_module_on_meta
from merak.runtime.memory.policy import WHOLE_STAGE, LayerAction, stage_layers
from merak.runtime.memory.layer_graph import attention_cores, layer_ranges

__all__ = [
    "PRECISIONS",
    "SavedTensorProfile",
    "profile_saved_tensors",
    "pipeline_cuts",
    "LayerFootprint",
    "StageFootprint",
    "stage_footprints",
    "SavedTensorCounter",
    "RetainedStorageMeter",
]

#: Training precisions: fp32, or autocast to bf16 / fp16 with fp32 parameters.
PRECISIONS = ("fp32", "bf16", "fp16")
_LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# CUDA autocast's op lists (torch/csrc/autograd/autocast_mode / amp docs), by torch-function name.
_AUTOCAST_LOW = frozenset({
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm",
    "addmv", "mv", "chain_matmul", "multi_dot", "einsum", "conv1d", "conv2d", "conv3d",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu",
    "scaled_dot_product_attention",
})
_AUTOCAST_FP32 = frozenset({
    "softmax", "log_softmax", "layer_norm", "group_norm", "cross_entropy", "nll_loss", "mse_loss",
    "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "binary_cross_entropy_with_logits",
    "cumsum", "cumprod", "prod", "sum", "exp", "expm1", "log", "log1p", "log2", "log10", "pow",
    "__pow__", "__rpow__", "rsqrt", "reciprocal", "norm", "logsumexp", "softplus",
    "cosine_similarity", "erfinv", "acos", "asin", "cosh", "sinh", "tan",
})
_SDPA = F.scaled_dot_product_attention


class _AutocastEmulation(TorchFunctionMode):
    """CUDA autocast's casting rules at the torch-function level (see the module docstring).

    Casting above autograd (as real autocast does) makes the casts part of the recorded graph,
    so what backward saves has the dtype it would have under ``torch.autocast``.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _AUTOCAST_LOW:
            target = self.dtype
        elif name in _AUTOCAST_FP32:
            target = torch.float32
        else:
            return func(*args, **kwargs)

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(target) if t.is_floating_point() and t.dtype != target else t

        args, kwargs = pytree.tree_map_only(torch.Tensor, cast, (args, kwargs))
        return func(*args, **kwargs)


def _precision_mode(precision: str) -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    return _AutocastEmulation(_LOW_DTYPES[precision]) if precision in _LOW_DTYPES else contextlib.nullcontext()


# ---- storage identity ------------------------------------------------------------------------------
def _storage_id(t: torch.Tensor) -> int:
    """Identity of the memory behind ``t``: views, ``detach()`` results and the tensor itself
    share it (also on meta, where there is no data pointer)."""
    return t.untyped_storage()._cdata


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class _Storages:
    """Interns storages as small integer keys, keeping the tensors alive so ids are never reused."""

    def __init__(self) -> None:
        self.key_of: dict[int, int] = {}
        self.sizes: list[int] = []
        self.producers: list[str] = []
        self._alive: list[torch.Tensor] = []

    def key(self, t: torch.Tensor, producer: str) -> int:
        sid = _storage_id(t)
        key = self.key_of.get(sid)
        if key is None:
            key = self.key_of[sid] = len(self.sizes)
            self.sizes.append(_storage_bytes(t))
            self.producers.append(producer)
            self._alive.append(t)
        return key

    def synthetic(self, nbytes: int, producer: str) -> int:
        """A key for memory a fused kernel saves that the meta run does not create."""
        self.sizes.append(nbytes)
        self.producers.append(producer)
        return len(self.sizes) - 1


# ---- the profile -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SavedTensorProfile:
    """What one forward of the traced graph keeps for backward, by node.

    Storages are small integer keys: ``sizes[key]`` is its bytes, ``producers[key]`` the node
    that created it (the node whose output it is, or the node inside which it was made, e.g. a
    dropout mask). ``saved[node]`` are the storages autograd saved while ``node`` ran (a set per
    node; deduplication happens when sets are united); ``values[node]`` are the storages of the
    node's output value. ``received[stage][value]`` is the storage of a value as the receiving
    stage holds it (its own contiguous copy, a leaf that requires grad, as the executor hands it
    over). Parameter storages never appear.
    """

    sizes: tuple[int, ...]
    producers: tuple[str, ...]
    saved: Mapping[str, frozenset[int]]
    values: Mapping[str, frozenset[int]]
    received: Mapping[int, Mapping[str, frozenset[int]]]
    precision: str

    def nbytes(self, keys: Iterable[int], sharded_nodes: Collection[str] = (), tp: int = 1) -> int:
        """Bytes of the storages ``keys``; a storage produced by a node in ``sharded_nodes``
        (tensor-parallel values) is split over ``tp`` ranks."""
        total = 0
        for k in keys:
            size = self.sizes[k]
            total += size // tp if tp > 1 and self.producers[k] in sharded_nodes else size
        return total

    def value_keys(self, name: str, stage: int | None = None) -> frozenset[int]:
        """Storages of value ``name`` as ``stage`` sees it (received values are the stage's copies)."""
        if stage is not None and name in self.received.get(stage, {}):
            return self.received[stage][name]
        return self.values.get(name, frozenset())

    def node_saved_bytes(self, node: str) -> int:
        """Bytes autograd saves while running ``node`` (storages shared with other nodes included)."""
        return self.nbytes(self.saved.get(node, ()))

    def total_saved_bytes(self) -> int:
        """Everything one forward saves (each storage once)."""
        return self.nbytes(frozenset().union(*self.saved.values()))


#: Stage boundaries of a run: first compute node of a stage -> (stage, values it receives).
Cuts = Mapping[str, tuple[int, tuple[str, ...]]]

_PROFILES: "weakref.WeakKeyDictionary[ProxyGraph, dict[Any, SavedTensorProfile]]" = weakref.WeakKeyDictionary()


def profile_saved_tensors(graph: ProxyGraph, precision: str = "fp32", cuts: Cuts | None = None,
                          fuse: bool = True) -> SavedTensorProfile:
    """Run ``graph`` forward on meta tensors and record what autograd saves per node.

    ``fuse`` profiles the graph as stages run it by default, with op chains fused
    (:mod:`merak.partitioner.fusion`; a fused GELU saves its input, not eight intermediates).

    With ``cuts`` (see :func:`pipeline_cuts`), each stage starts from fresh copies of the values
    it receives, as in the pipeline: two received values never share storage even where the
    sender's were views of one tensor. Cached per graph, precision and cuts (the meta run of
    LLaMA-2-7B at sequence 4096 takes seconds).
    """
    cuts = dict(cuts or {})
    key = (precision, tuple(sorted(cuts.items())), fuse)
    cached = _PROFILES.setdefault(graph, {})
    if key not in cached:
        with _precision_mode(precision):
            cached[key] = _MetaRun(graph, precision, cuts, fuse).run()
    return cached[key]


def pipeline_cuts(plan: Any) -> dict[str, tuple[int, tuple[str, ...]]]:
    """The :data:`Cuts` of a partition plan (``merak.partitioner.PartitionPlan``)."""
    return {plan.stage_nodes(s)[0].name: (s, tuple(plan.recv_inputs(s)))
            for s in range(1, plan.num_stages) if plan.stage_nodes(s)}


class _MetaRun:
    """One forward of a traced graph on meta tensors, recording saved storages per node."""

    def __init__(self, graph: ProxyGraph, precision: str, cuts: Cuts, fuse: bool = True) -> None:
        self.graph = graph
        self.nodes = list((fused_copy(graph.traced.graph) if fuse else graph.traced.graph).nodes)
        self.precision = precision
        self.cuts = cuts
        self.storages = _Storages()
        self.saved: dict[str, set[int]] = {}
        self.values: dict[str, frozenset[int]] = {}
        self.received: dict[int, dict[str, frozenset[int]]] = {}
        self.state_tensors: list[torch.Tensor] = []  # meta twins of parameters, buffers, constants
        self.current = ""
        self.paused = False
        self.module_state: dict[int, dict[str, torch.Tensor]] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not self.paused:
            self.saved.setdefault(self.current, set()).add(self.storages.key(t, self.current))
        return t

    def run(self) -> SavedTensorProfile:
        traced = self.graph.traced
        trace_devices = {torch.device(d) for d in traced.trace_devices}
        meta = torch.device("meta")
        env: dict[fx.Node, Any] = {}
        by_name = {n.name: n for n in self.nodes}

        def lookup(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return env[a]
            return meta if isinstance(a, torch.device) and a in trace_devices else a

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            for node in self.nodes:
                if node.op == "output":
                    continue
                if node.name in self.cuts:
                    stage, names = self.cuts[node.name]
                    self._receive(stage, names, by_name, env)
                self.current = node.name
                args = fx.node.map_aggregate(node.args, lookup)
                kwargs = fx.node.map_aggregate(node.kwargs, lookup)
                value = self._run_node(node, args, kwargs)
                env[node] = value
                traced_node = self.graph.by_name.get(node.name)  # None: a node a fusion rule added
                if traced_node is not None and traced_node.role == PARAM:
                    self.state_tensors.extend(t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))
                    continue
                self.values[node.name] = frozenset(
                    self.storages.key(t, node.name) for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))
        for state in self.module_state.values():
            self.state_tensors.extend(state.values())
        excluded = {self.storages.key_of[sid] for sid in map(_storage_id, self.state_tensors)
                    if sid in self.storages.key_of}
        return SavedTensorProfile(
            sizes=tuple(self.storages.sizes),
            producers=tuple(self.storages.producers),
            saved={n: frozenset(keys - excluded) for n, keys in self.saved.items() if keys - excluded},
            values={n: keys - excluded for n, keys in self.values.items()},
            received={s: {n: keys - excluded for n, keys in v.items()} for s, v in self.received.items()},
            precision=self.precision,
        )

    def _receive(self, stage: int, names: tuple[str, ...], by_name: dict[str, fx.Node], env: dict[fx.Node, Any]) -> None:
        """Replace the values ``stage`` receives by fresh leaves, as the executor hands them over."""
        low = _LOW_DTYPES.get(self.precision)

        def fresh(t: torch.Tensor) -> torch.Tensor:
            # Activations cross the cut in the compute dtype (MixedPrecision.on_wire).
            wire = low if low is not None and t.is_floating_point() and t.requires_grad else t.dtype
            copy = torch.empty(t.shape, dtype=wire, device=t.device)
            return copy.requires_grad_(t.requires_grad) if t.is_floating_point() else copy

        received = self.received.setdefault(stage, {})
        for name in names:
            node = by_name[name]
            env[node] = pytree.tree_map_only(torch.Tensor, fresh, env[node])
            received[name] = frozenset(self.storages.key(t, name) for t in pytree.tree_leaves(env[node])
                                       if isinstance(t, torch.Tensor))

    def _run_node(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        traced = self.graph.traced
        if node.op == "placeholder":
            return meta_like(traced.example_inputs[node.target])
        if node.op == "get_attr":
            obj = traced.constants[node.target] if node.target in traced.constants else resolve_path(traced.model, node.target)
            return meta_like(obj)
        if node.op == "call_module":
            return run_module_on_meta(traced.model.get_submodule(node.target), args, kwargs, self.module_state)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.target is _SDPA:
            return self._fused_attention(node.name, args, kwargs)
        return node.target(*args, **kwargs)

    def _fused_attention(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        """Scaled dot-product attention costed as the fused kernels save (module docstring)."""
        names = ("query", "key", "value", "attn_mask")
        operands = {n: (args[i] if i < len(args) else kwargs.get(n)) for i, n in enumerate(names)}
        low = _LOW_DTYPES.get(self.precision)
        if low is not None:
            for n in ("query", "key", "value"):
                operands[n] = operands[n].to(low)  # recorded (and saved by the cast's users) as autocast does
        rest = {k: v for k, v in kwargs.items() if k not in names}
        q, mask = operands["query"], operands["attn_mask"]
        self.paused = True
        try:
            out = _SDPA(q, operands["key"], operands["value"], *args[4:], attn_mask=mask, **rest)
            # Fused kernels write the output as (batch, seq, heads, dim) and return a transposed
            # view, so the usual ``transpose(1, 2).contiguous()`` after attention copies nothing.
            if out.dim() == 4:
                out = out.transpose(1, 2).contiguous().transpose(1, 2)
        finally:
            self.paused = False
        saved = self.saved.setdefault(name, set())
        saved.update(self.storages.key(t, name) for t in (q, operands["key"], operands["value"], out))
        if isinstance(mask, torch.Tensor):
            if mask.dtype == torch.bool:  # converted to an additive float mask per call, and saved
                saved.add(self.storages.synthetic(mask.numel() * q.element_size(), name))
            else:
                saved.add(self.storages.key(mask, name))
        lse_bytes = 4 * q.numel() // q.shape[-1]  # float32 per (batch, head, query position)
        saved.add(self.storages.synthetic(lse_bytes, name))
        return out


# ---- per stage: what each layer action keeps -----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerFootprint:
    """One layer's part of a stage (a layer cut by a stage boundary has a part on both stages).

    Storage sets, per action: ``kept`` (everything its nodes save), ``inputs`` (what a
    recomputation needs: the values it reads from outside its range), ``selective`` (``kept``
    minus the attention cores' saved tensors, plus the cores' inputs); offloaded layers keep
    nothing on the device. ``nodes`` are its nodes.
    """

    name: str
    nodes: tuple[str, ...]
    kept: frozenset[int]
    inputs: frozenset[int]
    selective: frozenset[int]
    has_attention_core: bool


@dataclasses.dataclass(frozen=True)
class StageFootprint:
    """A stage's saved activations per micro-batch, for any per-layer plan.

    ``outside`` are storages saved by nodes in no layer (embeddings, final norm, head, loss:
    always kept); ``received`` / ``sent`` the storages of the values the stage receives from the
    previous stage / sends to the next; ``outputs`` what the executor holds from a micro-batch's
    forward to its backward: the sent values, or on the last stage the model's outputs (logits).
    Received values always count: the executor holds them until the backward (for their
    gradients), and so does autograd. Byte counts divide tensor-parallel values
    (``sharded_nodes``) by ``tp``.
    """

    stage: int
    profile: SavedTensorProfile
    layers: tuple[LayerFootprint, ...]
    outside: frozenset[int]
    received: frozenset[int]
    sent: frozenset[int]
    outputs: frozenset[int]
    sharded_nodes: frozenset[str] = frozenset()
    tp: int = 1

    def layer(self, name: str) -> LayerFootprint:
        for part in self.layers:
            if part.name == name:
                return part
        raise KeyError(f"stage {self.stage} has no layer {name!r}; its layers: {[p.name for p in self.layers]}")

    def nbytes(self, keys: Iterable[int]) -> int:
        return self.profile.nbytes(keys, self.sharded_nodes, self.tp)

    def retained(self, actions: Mapping[str, LayerAction | str], materialized: bool = False) -> frozenset[int]:
        """Storages one micro-batch keeps on the device with per-layer ``actions`` (absent = keep)
        between its forward and its ``RECOMPUTE`` (``materialized=False``) or from there to its
        backward (``True``: recomputed parts are back; offloaded ones stay on the host)."""
        keys = set(self.outside) | self.received  # held by the executor (and autograd) until backward
        for part in self.layers:
            keys |= self._part(part, LayerAction(actions.get(part.name, "keep")).value, materialized)
        return frozenset(keys)

    def _part(self, part: LayerFootprint, action: str, materialized: bool) -> frozenset[int]:
        if action == "keep":
            return part.kept
        if action == "recompute":  # the frame holds its inputs until the backward
            return part.kept | part.inputs if materialized else part.inputs
        if action == "selective":
            return part.kept | part.selective if materialized else part.selective
        if action == "offload":
            return frozenset()  # on the host (received inputs, referenced anyway, are never moved)
        raise ValueError(f"unknown layer action {action!r} for {part.name}")

    def layer_bytes(self, name: str) -> dict[str, int]:
        """Bytes ``name`` alone keeps per micro-batch under each action (shared storages counted
        in full here; stage totals count them once)."""
        part = self.layer(name)
        return {a: self.nbytes(self._part(part, a, False)) for a in ("keep", "recompute", "selective", "offload")}


def stage_footprints(plan: Any, precision: str = "fp32", sharded_nodes: Collection[str] = (),
                     tp: int = 1) -> list[StageFootprint]:
    """One :class:`StageFootprint` per stage of the partition ``plan``.

    Layers and attention cores are delimited exactly as the executor delimits them
    (:func:`merak.runtime.memory.layer_graph.layer_ranges` / ``attention_cores``), so a layer's
    ``inputs`` are what its recomputation frame holds.
    """

    profile = profile_saved_tensors(plan.graph, precision, pipeline_cuts(plan))
    fx_nodes = {n.name: n for n in plan.graph.graph.nodes}
    return [_stage_footprint(plan, profile, stage, names, fx_nodes, frozenset(sharded_nodes), tp)
            for stage, names in enumerate(stage_layers(plan))]


def _stage_footprint(plan: Any, profile: SavedTensorProfile, stage: int, names: tuple[str, ...],
                     fx_nodes: Mapping[str, fx.Node], sharded: frozenset[str], tp: int) -> StageFootprint:
    def values(value_names: Iterable[str]) -> frozenset[int]:
        return frozenset().union(*(profile.value_keys(n, stage) for n in value_names))

    def saved(node_names: Iterable[str]) -> frozenset[int]:
        return frozenset().union(*(profile.saved.get(n, frozenset()) for n in node_names))

    def inputs_of(span: list[fx.Node]) -> frozenset[int]:
        inside = set(span)
        return values(i.name for n in span for i in n.all_input_nodes if i not in inside)

    nodes = [fx_nodes[n.name] for n in plan.stage_nodes(stage)]
    spans = {WHOLE_STAGE: (0, len(nodes) - 1)} if names == (WHOLE_STAGE,) else layer_ranges(nodes, names)
    parts, covered = [], set()
    for name in names:
        first, last = spans[name]
        span = nodes[first:last + 1]
        covered.update(n.name for n in span)
        cores = [nodes[a:b + 1] for a, b in attention_cores(nodes, first, last)]
        core_names = {n.name for core in cores for n in core}
        selective = saved(n.name for n in span if n.name not in core_names).union(*map(inputs_of, cores))
        parts.append(LayerFootprint(name, tuple(n.name for n in span), saved(n.name for n in span),
                                    inputs_of(span), frozenset(selective), bool(cores)))
    outside = saved(n.name for n in nodes if n.name not in covered)
    sent = values(plan.send_outputs(stage))
    if stage == plan.num_stages - 1:
        output = next(n for n in plan.graph.graph.nodes if n.op == "output")
        outputs = values(n.name for n in output.all_input_nodes)
    else:
        outputs = sent
    return StageFootprint(stage, profile, tuple(parts), outside, values(plan.recv_inputs(stage)), sent, outputs,
                          sharded, tp)


# ---- measuring a real run --------------------------------------------------------------------------
class SavedTensorCounter:
    """Counts the bytes autograd saves during a real forward, deduplicated by storage and without
    ``exclude``'s storages (pass the stage's parameters and buffers), as the meta profile does.

    Use as a context manager around the forward; ``nbytes`` is valid afterwards. Storages held
    by torch's non-reentrant checkpoint for recomputation are counted too: it saves its inputs
    through the same hooks.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {_storage_id(t) for t in exclude}
        self._sizes: dict[int, int] = {}
        self._alive: list[torch.Tensor] = []  # so a counted storage's id cannot be reused
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @classmethod
    def for_module(cls, module: nn.Module) -> "SavedTensorCounter":
        return cls([*module.parameters(), *module.buffers()])

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        sid = _storage_id(t)
        if sid not in self._excluded and sid not in self._sizes:
            self._sizes[sid] = _storage_bytes(t)
            self._alive.append(t)
        return t

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def release(self) -> None:
        """Drop the references that kept counted storages alive (``nbytes`` stays valid)."""
        self._alive.clear()


class RetainedStorageMeter(TorchDispatchMode):
    """Bytes of the storages created inside the block (plus ``inputs``) that are still alive when
    :meth:`alive_bytes` is called - what a forward leaves behind for its backward, whatever keeps
    it (autograd's saved tensors, a recomputation frame holding its inputs, an offload copy).

    Drop your own references to the outputs (keep ``out.grad_fn`` to hold the graph) before
    asking. ``exclude`` (the module's parameters and buffers) is never counted.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), inputs: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._excluded = {_storage_id(t) for t in exclude}
        self._refs: dict[int, tuple[StorageWeakRef, int]] = {}
        for t in inputs:
            self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        sid = _storage_id(t)
        if sid in self._excluded:
            return
        known = self._refs.get(sid)
        if known is None or known[0].expired():  # a freed storage's address may be reused
            self._refs[sid] = (StorageWeakRef(t.untyped_storage()), _storage_bytes(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def alive_bytes(self, exclude: Iterable[torch.Tensor] = (), collect: bool = True) -> int:
        """Bytes still alive, without the storages of ``exclude`` (e.g. the current gradients).
        ``collect=False`` skips the garbage collector (for frequent sampling: reference counting
        already frees everything not caught in a cycle)."""
        if collect:
            gc.collect()
        skip = {_storage_id(t) for t in exclude}
        return sum(size for sid, (ref, size) in self._refs.items() if sid not in skip and not ref.expired())
