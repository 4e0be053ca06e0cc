"""Stage modules: one fx ``GraphModule`` per pipeline stage, owning only that stage's parameters.

Why a graph per stage (not a slice of ``nn.Sequential``): arbitrary models have skip
connections, shared parameters and non-tensor values flowing between layers. A stage graph makes
all of that explicit: it reads the batch keys it needs from ``data`` (every stage gets the batch
from the data iterator, so raw inputs are never forwarded), reads values produced by earlier
stages from ``received``, recomputes cheap replicated values (masks, position ids) locally, and
returns exactly its ``send_outputs`` - values computed here plus values a later stage needs that
only pass through (skip connections).

Why original names: ``call_module`` / ``get_attr`` targets are the original qualified names, and
``GraphModule`` rebuilds that hierarchy, so ``stage.named_parameters()`` yields
``transformer.h.3.attn.c_attn.weight`` - checkpoints, HF export and tensor parallelism work
with names they already know.

Materialization: a model with real weights is referenced (same ``Parameter`` objects, so
gradients land in the original model). A meta model is *mirrored* along the paths this stage
uses and only those tensors are materialized on ``device`` and initialized by the model's own init
with per-parameter seeds (see :mod:`.meta`), so a 20B model's stage costs only its own memory.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from .fusion import fuse as fuse_chains
from .meta import canonical_parameter_names, first_device, is_meta_module, materialize, mirror
from .proxy_graph import COMPUTE, INPUT, OUTPUT, REPLICATED, ProxyGraph, mutators_of
from .sharding import PartitionPlan
from .tracer import resolve_path

__all__ = ["StageModule", "build_stage", "run_sequentially"]

DEVICE_ANCHOR = "_merak_device"


class StageModule(fx.GraphModule):
    """One pipeline stage: ``forward(data, received) -> dict``.

    Attributes: ``stage_id``, ``num_stages``, ``is_first``, ``is_last``, ``data_inputs`` (batch
    keys read), ``recv_inputs`` / ``send_outputs`` (value names from the previous / to the next
    stage; ``send_outputs`` of stage s equals ``recv_inputs`` of stage s+1), ``output_keys`` (the
    model's outputs, last stage only), ``tied_parameters`` (canonical name -> local name of every
    parameter another stage also holds; their gradients must be summed), ``canonical_names``
    (local name -> the model's canonical name of every tensor whose names differ: a tie held
    twice in one stage; checkpoints key tensors by it), ``flavour``,
    ``dynamic_shapes`` (whether batch size / sequence length may differ from the trace) and
    ``fusions`` (op chains replaced by one kernel, by rule).
    """

    stage_id: int
    num_stages: int
    data_inputs: tuple[str, ...]
    recv_inputs: tuple[str, ...]
    send_outputs: tuple[str, ...]
    output_keys: tuple[str, ...]
    tied_parameters: dict[str, str]
    canonical_names: dict[str, str]
    flavour: str
    dynamic_shapes: bool
    fusions: dict[str, int]

    _STAGE_ATTRIBUTES = ("stage_id", "num_stages", "data_inputs", "recv_inputs", "send_outputs", "output_keys",
                         "tied_parameters", "canonical_names", "flavour", "dynamic_shapes", "fusions")

    def __deepcopy__(self, memo: dict[int, Any]) -> "StageModule":
        # GraphModule's deepcopy rebuilds the module from its graph, dropping plain attributes and
        # buffer persistence flags; carry both over.
        res = super().__deepcopy__(memo)
        for attr in self._STAGE_ATTRIBUTES:
            if attr in self.__dict__:
                setattr(res, attr, copy.deepcopy(self.__dict__[attr], memo))
        copies = dict(res.named_modules())
        for name, module in self.named_modules():
            if name in copies:
                copies[name]._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
        return res

    @property
    def is_first(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def __repr__(self) -> str:
        return (f"StageModule(stage {self.stage_id}/{self.num_stages}, data_inputs={list(self.data_inputs)}, "
                f"recv={len(self.recv_inputs)}, send={len(self.send_outputs)}, "
                f"params={sum(p.numel() for p in self.parameters())}, tied={list(self.tied_parameters)})")


def _needed_nodes(graph: ProxyGraph, plan: PartitionPlan, stage_id: int) -> tuple[set[str], set[str], set[str]]:
    """(local nodes to copy, batch inputs read, values received) for ``stage_id``."""
    by_name = graph.by_name
    own = {n.name for n in plan.stage_nodes(stage_id)}
    received = set(plan.recv_inputs(stage_id))
    roots = set(own) | ({n.name for n in graph.nodes if n.role == OUTPUT} if stage_id == plan.num_stages - 1 else set())
    local: set[str] = set()
    inputs: set[str] = set()
    mutators = mutators_of([n for n in graph.nodes if n.role == REPLICATED])
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in local:
            continue
        rec = by_name[name]
        if rec.role == INPUT:
            inputs.add(name)
            continue
        if rec.role == COMPUTE and name not in own:
            if name not in received:
                raise AssertionError(f"stage {stage_id} needs {name} which it neither computes nor receives")
            continue
        local.add(name)
        if rec.device_query:
            continue  # answered by the stage's own device anchor
        stack.extend(rec.inputs)
        if rec.role == REPLICATED:
            stack.extend(mutators.get(name, ()))
    local.discard(next((n.name for n in graph.nodes if n.role == OUTPUT), ""))
    return local, inputs, received


def _stage_graph(graph: ProxyGraph, plan: PartitionPlan, stage_id: int) -> tuple[fx.Graph, tuple[str, ...], tuple[str, ...]]:
    """The fx graph of one stage; returns (graph, data_inputs, output_keys)."""
    local, input_names, received = _needed_nodes(graph, plan, stage_id)
    src = graph.graph
    placeholders = {n.name: n.target for n in src.nodes if n.op == "placeholder"}
    trace_devices = {torch.device(d) for d in graph.traced.trace_devices}
    g = fx.Graph()
    data = g.placeholder("data")
    recv = g.placeholder("received")
    anchor = None
    env: dict[fx.Node, Any] = {}

    def device() -> fx.Node:
        nonlocal anchor
        if anchor is None:
            with g.inserting_after(recv):
                buf = g.get_attr(DEVICE_ANCHOR)
            with g.inserting_after(buf):
                anchor = g.call_function(getattr, (buf, "device"))
        return anchor

    def retarget(value: Any) -> Any:
        # torch.export bakes the trace device into ops; use the stage's device instead.
        if isinstance(value, torch.device) and value in trace_devices:
            return device()
        return value

    data_inputs = tuple(placeholders[n] for n in placeholders if n in input_names)
    for node in src.nodes:
        if node.op == "placeholder" and node.name in input_names:
            env[node] = g.create_node("call_function", operator.getitem, (data, node.target), name=node.name)
        elif node.name in received:
            env[node] = g.create_node("call_function", operator.getitem, (recv, node.name), name=node.name)
            env[node].meta["merak_received"] = True  # named as the op, computed by an earlier stage
            if "merak_value" in node.meta:  # what arrives (e.g. a torch.Size), for graph rewrites
                env[node].meta["merak_value"] = node.meta["merak_value"]
    for node in src.nodes:
        if node.name not in local:
            continue
        rec = graph.by_name[node.name]
        if rec.device_query:
            env[node] = device()
            continue
        copied = g.node_copy(node, lambda n: env[n])
        if graph.flavour == "export":
            copied.args = fx.node.map_aggregate(copied.args, retarget)
            copied.kwargs = fx.node.map_aggregate(copied.kwargs, retarget)
        env[node] = copied
    out = next(n for n in src.nodes if n.op == "output")
    if stage_id == plan.num_stages - 1:
        result = fx.node.map_arg(out.args[0], lambda n: env[n])
        output_keys = tuple(result)
    else:
        by_name = {n.name: n for n in src.nodes}
        result = {name: env[by_name[name]] for name in plan.send_outputs(stage_id)}
        output_keys = ()
    g.output(result)
    g.lint()
    return g, data_inputs, output_keys


def _targets(g: fx.Graph, op: str) -> list[str]:
    return list(dict.fromkeys(str(n.target) for n in g.nodes if n.op == op and n.target != DEVICE_ANCHOR))


def _tensor_paths(model_root: nn.Module, modules: Iterable[str], attrs: Iterable[str],
                  canonical: dict[int, str]) -> dict[str, str]:
    """Qualified name in the stage -> canonical name in the model, for every tensor the stage holds."""
    paths: dict[str, str] = {}
    for target in modules:
        module = model_root.get_submodule(target)
        for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
            paths[f"{target}.{name}"] = canonical.get(id(t), f"{target}.{name}")
    for target in attrs:
        value = resolve_path(model_root, target)
        if isinstance(value, torch.Tensor):
            paths[target] = canonical.get(id(value), target)
    return paths


def _is_tensor_path(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(resolve_path(model, path), torch.Tensor)
    except AttributeError:
        return False


def _non_persistent(model: nn.Module, target: str) -> bool:
    owner_path, _, attr = target.rpartition(".")
    try:
        owner = model.get_submodule(owner_path) if owner_path else model
    except AttributeError:
        return True
    return attr in getattr(owner, "_non_persistent_buffers_set", set()) or attr not in owner._buffers


def build_stage(
    plan: PartitionPlan,
    stage_id: int,
    device: torch.device | str | None = "cpu",
    seed: int = 1234,
    fuse: bool = True,
) -> StageModule:
    """Build the :class:`StageModule` of ``stage_id``.

    Real-weight model: the stage references the model's own parameters (no copy); it is moved to
    ``device`` if that differs (``device=None`` leaves it where it is - note moving a shared
    ``Parameter`` moves it for the model too). Meta model: only this stage's tensors are created,
    on ``device`` (CPU when ``None``), initialized by the model's init with seeds derived from
    ``seed`` and each parameter's canonical name. ``fuse`` replaces op chains that have a native
    kernel (the tanh GELU) by that kernel (:mod:`merak.partitioner.fusion`); ``stage.fusions``
    counts what was fused.
    """
    graph = plan.graph
    model = graph.model
    plan._check_stage(stage_id)
    g, data_inputs, output_keys = _stage_graph(graph, plan, stage_id)
    modules, attrs = _targets(g, "call_module"), _targets(g, "get_attr")
    canonical = canonical_parameter_names(model)
    constants = graph.traced.constants
    model_attrs = [a for a in attrs if a not in constants]
    meta = is_meta_module(model)
    source: nn.Module = model
    paths = _tensor_paths(model, modules, model_attrs, canonical)
    if meta:
        # Tied tensors are also bound at their canonical path, whose module initializes them.
        init_paths = {**paths, **{c: c for c in paths.values() if c not in paths and _is_tensor_path(model, c)}}
        owners = [*modules, *(p.rpartition(".")[0] for p in init_paths)]
        source = mirror(model, owners)
        materialize(source, init_paths, device if device is not None else "cpu", seed)
    root: dict[str, Any] = {t: source.get_submodule(t) for t in modules}
    root.update({a: resolve_path(source, a) for a in model_attrs})
    root.update({a: constants[a] for a in attrs if a in constants})
    held = [t for m in modules for t in [*source.get_submodule(m).parameters(), *source.get_submodule(m).buffers()]]
    held += [v for v in (resolve_path(source, a) for a in model_attrs) if isinstance(v, torch.Tensor)]
    target_device = torch.device(device) if device is not None else first_device(held)
    root[DEVICE_ANCHOR] = torch.empty(0, device=target_device)
    stale = [a for a in attrs if a in constants and constants[a].device.type == "meta"]
    if stale:
        raise RuntimeError(f"the trace created tensor constants {stale} on the meta device; their values are "
                           "unknown. Trace with real example inputs or mark the module creating them as a leaf")
    stage = StageModule(root, g, class_name=f"Stage{stage_id}")
    stage.fusions = fuse_chains(stage) if fuse else {}
    _restore_buffer_persistence(stage, model, [*attrs, DEVICE_ANCHOR], constants)
    if device is not None:
        if meta:  # only trace constants can still be elsewhere
            for name in attrs:
                if name in constants:
                    owner_path, _, attr = name.rpartition(".")
                    owner = stage.get_submodule(owner_path) if owner_path else stage
                    owner._buffers[attr] = owner._buffers[attr].to(target_device)
        else:
            stage.to(target_device)
    _set_stage_attributes(stage, plan, stage_id, data_inputs, output_keys, canonical, paths if meta else None)
    return stage


def build_chunks(
    plan: PartitionPlan,
    virtual_stages: Sequence[int],
    device: torch.device | str | None = "cpu",
    seed: int = 1234,
    fuse: bool = True,
) -> list[StageModule]:
    """Build the model chunks one rank holds under virtual stages (``plan`` cut into ``P·v``
    stages; ``virtual_stages`` lists this rank's, by chunk index, e.g. ``placement.chunks_of(rank)``).

    A tied parameter held by two of these chunks (the V placement puts the embedding and the
    LM head on rank 0) becomes one ``Parameter`` object in both, so its gradient accumulates in
    one place and the optimizer steps it once; only ties that cross ranks need a reduction.
    """
    chunks = [build_stage(plan, k, device=device, seed=seed, fuse=fuse) for k in virtual_stages]
    first: dict[str, nn.Parameter] = {}
    for chunk in chunks:
        for key, local in chunk.tied_parameters.items():
            owner_path, _, attr = local.rpartition(".")
            owner = chunk.get_submodule(owner_path) if owner_path else chunk
            if key in first:
                owner._parameters[attr] = first[key]
            else:
                first[key] = owner._parameters[attr]
    return chunks


class StageChunks(nn.Module):
    """A rank's model chunks as one module, for code that wants one model per rank (the
    trainer's optimizer, ``train()``/``eval()``, checkpoints, export): parameters shared by two
    chunks appear once, and ``state_dict`` / ``load_state_dict`` use the model's own names (the
    chunks hold disjoint parts of one model), so checkpoints and exports read like a stage's.
    ``tied_parameters`` maps canonical names to those names."""

    def __init__(self, chunks: Sequence[StageModule]) -> None:
        super().__init__()
        self.chunks = nn.ModuleList(chunks)
        tied: dict[str, str] = {}
        for chunk in chunks:
            for key, local in chunk.tied_parameters.items():
                tied.setdefault(key, local)
        self.tied_parameters = tied
        self.canonical_names = {k: v for chunk in chunks for k, v in getattr(chunk, "canonical_names", {}).items()}

    # Tensor parallelism is applied chunk by chunk (one plan, one TP group, one RNG stream; see
    # ``apply_tensor_parallel``). Code written for one stage per rank (gradient norm, evaluation,
    # checkpoints, export) reads these merged views, keyed like :meth:`state_dict`: chunks hold
    # disjoint parts of one model under the model's own names, so the keys never collide.
    @property
    def tp_param_specs(self) -> dict[str, Any]:
        """Parameter name -> ``ShardSpec`` of every TP-sharded parameter of every chunk."""
        return {name: spec for chunk in self.chunks for name, spec in (getattr(chunk, "tp_param_specs", None) or {}).items()}

    @property
    def tp_sharded_outputs(self) -> dict[str, Any]:
        """Model outputs a chunk keeps TP-sharded (only the last virtual stage has outputs)."""
        return {k: v for chunk in self.chunks for k, v in (getattr(chunk, "tp_sharded_outputs", None) or {}).items()}

    @property
    def tp_group(self) -> Any:
        """The tensor-parallel group every chunk was sharded over (``None`` without TP)."""
        return getattr(self.chunks[0], "tp_group", None)

    @property
    def tp_plan(self) -> Any:
        """The tensor-parallel plan every chunk was sharded by (``None`` without TP)."""
        return getattr(self.chunks[0], "tp_plan", None)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        merged: dict[str, Any] = {}
        for chunk in self.chunks:
            for name, value in chunk.state_dict(*args, **kwargs).items():
                merged.setdefault(name, value)
        return merged

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise RuntimeError(f"loading model chunks: missing keys {missing[:20]}, unexpected keys {unexpected[:20]}")
        for chunk in self.chunks:
            own = chunk.state_dict().keys()
            chunk.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False, assign=assign)
        return nn.modules.module._IncompatibleKeys(missing, unexpected)


def _restore_buffer_persistence(stage: nn.Module, model: nn.Module, attrs: list[str], constants: dict[str, Any]) -> None:
    """GraphModule registers every get_attr tensor as a persistent buffer; keep the model's flags so
    ``stage.state_dict()`` keys match the model's (trace constants and the device anchor are
    not state)."""
    for target in attrs:
        owner_path, _, attr = target.rpartition(".")
        owner = stage.get_submodule(owner_path) if owner_path else stage
        if attr not in owner._buffers:
            continue
        if target in constants or target == DEVICE_ANCHOR or _non_persistent(model, target):
            owner._non_persistent_buffers_set.add(attr)


def _set_stage_attributes(stage: StageModule, plan: PartitionPlan, stage_id: int, data_inputs: tuple[str, ...],
                          output_keys: tuple[str, ...], canonical: dict[int, str], paths: dict[str, str] | None) -> None:
    stage.stage_id = stage_id
    stage.num_stages = plan.num_stages
    stage.data_inputs = data_inputs
    stage.recv_inputs = plan.recv_inputs(stage_id)
    stage.send_outputs = plan.send_outputs(stage_id)
    stage.output_keys = output_keys
    stage.flavour = plan.graph.flavour
    stage.dynamic_shapes = plan.graph.dynamic
    shared = plan.tied_stages()
    tied: dict[str, str] = {}
    for local_name, p in stage.named_parameters(remove_duplicate=False):
        key = paths.get(local_name) if paths is not None else canonical.get(id(p))
        if key in shared and key not in tied:
            tied[key] = local_name
    stage.tied_parameters = tied
    named = [*stage.named_parameters(remove_duplicate=False), *stage.named_buffers(remove_duplicate=False)]
    names = {local: paths.get(local, local) if paths is not None else canonical.get(id(t), local) for local, t in named}
    stage.canonical_names = {local: name for local, name in names.items() if local != name}


def run_sequentially(stages: list[StageModule], data: dict[str, Any]) -> dict[str, Any]:
    """Run ``stages`` one after another in this process on one batch; returns the last stage's
    outputs. The single-process reference of a pipeline (and a check of the stage contract:
    each stage receives exactly what the previous one declared it sends)."""
    received: dict[str, Any] = {}
    for stage in stages:
        if tuple(received) != stage.recv_inputs:
            raise RuntimeError(f"stage {stage.stage_id} expects {stage.recv_inputs}, got {tuple(received)}")
        out = stage(data, received)
        if stage.is_last:
            return out
        if tuple(out) != stage.send_outputs:
            raise RuntimeError(f"stage {stage.stage_id} returned {tuple(out)}, declared {stage.send_outputs}")
        received = out
    raise ValueError("run_sequentially needs a list of stages ending with the last stage")
