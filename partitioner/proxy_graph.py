"""The proxy graph: the traced graph with a cost record on every node.

Why a separate layer over the fx graph: sharding needs, per node, forward FLOPs, the bytes of
parameters it reads, the bytes it outputs (what a cut after it would send), whether backward runs
through it, which repeated layer it belongs to, and its role:

* ``input``   - a placeholder (a key of the batch dict; every stage reads the batch itself),
* ``param``   - a ``get_attr`` (parameter, buffer or constant; copied into every stage using it),
* ``replicated`` - cheap values computed only from inputs and buffers (attention masks, position
  ids, sizes): each stage that needs one recomputes it instead of receiving it, which keeps
  masks and Python ints off the wire,
* ``compute`` - everything else; these form the sequence in which cuts are placed,
* ``output``  - the graph output.

Costs come from running every node once on meta tensors under
``torch.utils.flop_counter.FlopCounterMode`` - no hand-written FLOP formulas, and no memory.
"""

from __future__ import annotations

import dataclasses
import operator
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from .meta import canonical_parameter_names, meta_like
from .tracer import LeafSpec, TraceError, TracedGraph, resolve_path, run_module_on_meta, trace_graph

__all__ = ["TensorMeta", "ProxyNode", "ProxyGraph", "trace", "INPUT", "PARAM", "REPLICATED", "COMPUTE", "OUTPUT"]

INPUT, PARAM, REPLICATED, COMPUTE, OUTPUT = "input", "param", "replicated", "compute", "output"

_RANDOM_MARKERS = ("dropout", "rand", "bernoulli", "normal", "multinomial", "poisson", "exponential")
_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                      operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    """Shape, dtype and autograd flag of a tensor value (what a receiving stage must allocate)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclasses.dataclass
class ProxyNode:
    """One node of the traced graph with its costs (forward FLOPs, bytes) and role.

    ``memory_bytes`` is what the node reads and writes (0 for views and shape queries);
    ``sendable`` is False for containers holding tensors (never cut right after them);
    ``mutates`` names the value an in-place node updates; ``layer`` is the repeated block the
    node belongs to; ``device_query`` marks ``x.device`` (answered by each stage's own device).
    """

    name: str
    op: str
    target: str
    module: str
    role: str
    flops: int = 0
    param_bytes: int = 0
    params: tuple[str, ...] = ()
    output_bytes: int = 0
    memory_bytes: int = 0
    meta: Any = None
    requires_grad: bool = False
    mutates: str | None = None
    inputs: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    layer: str | None = None
    sendable: bool = True
    device_query: bool = False

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.meta, TensorMeta)


class ProxyGraph:
    """A traced model ready for sharding: fx graph + one :class:`ProxyNode` per fx node.

    ``nodes`` is in topological (execution) order; ``compute_nodes`` is the sub-sequence in which
    cut points are chosen. ``param_bytes`` / ``param_numel`` map canonical parameter names to
    their size, ``trace_seconds`` is how long tracing and costing took, and
    ``tie_groups`` maps a canonical name to all names of a parameter reachable under several names.
    ``layers`` are the repeated blocks found in the model (``transformer.h.0`` ...), in order.
    """

    def __init__(self, traced: TracedGraph, nodes: list[ProxyNode], param_bytes: dict[str, int],
                 param_numel: dict[str, int], tie_groups: dict[str, tuple[str, ...]],
                 layers: tuple[str, ...]) -> None:
        self.traced = traced
        self.nodes = nodes
        self.by_name = {n.name: n for n in nodes}
        self.param_bytes = param_bytes
        self.param_numel = param_numel
        self.trace_seconds = 0.0
        self.tie_groups = tie_groups
        self.layers = layers
        self.compute_nodes = [n for n in nodes if n.role == COMPUTE]

    @property
    def model(self) -> nn.Module:
        return self.traced.model

    @property
    def graph(self) -> fx.Graph:
        return self.traced.graph

    @property
    def flavour(self) -> str:
        return self.traced.flavour

    @property
    def dynamic(self) -> bool:
        return self.traced.dynamic

    @property
    def notes(self) -> list[str]:
        return self.traced.notes

    def node(self, name: str) -> ProxyNode:
        return self.by_name[name]

    @property
    def total_flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    @property
    def total_param_bytes(self) -> int:
        return sum(self.param_bytes.values())

    def __repr__(self) -> str:
        roles = {r: sum(1 for n in self.nodes if n.role == r) for r in (INPUT, PARAM, REPLICATED, COMPUTE)}
        return (f"ProxyGraph({type(self.model).__name__}, flavour={self.flavour}, dynamic={self.dynamic}, "
                f"nodes={roles}, layers={len(self.layers)}, GFLOPs={self.total_flops / 1e9:.3f}, "
                f"params={self.total_param_bytes / 2**20:.1f} MiB)")


def trace(
    model: nn.Module,
    example_inputs: Mapping[str, Any],
    leaf_modules: Sequence[LeafSpec] = (),
    flavour: str = "auto",
) -> ProxyGraph:
    """Trace ``model(**example_inputs)`` on the meta device and cost every node.

    ``model`` may hold real weights (they are referenced, never copied) or meta weights (built
    under :func:`init_empty_weights`); ``example_inputs`` may be real or meta tensors - only their
    shapes and dtypes matter. ``leaf_modules`` (types, class names or qualified names) are kept
    opaque. ``flavour`` is ``"auto"`` (fx, then torch.export), ``"fx"`` or ``"export"``.
    """
    start = time.perf_counter()
    # the caller's grad mode survives a node that fails half-way through switching it (torch.export's
    # wrap_with_set_grad_enabled left it off, and every later backward of the process failed)
    with torch.set_grad_enabled(torch.is_grad_enabled()):
        traced = trace_graph(model, example_inputs, leaf_modules, flavour)
        graph = annotate(traced)
    graph.trace_seconds = time.perf_counter() - start
    return graph


# ---- annotation ---------------------------------------------------------------------------------

def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__name__", None) or str(node.target)


def _describe(value: Any) -> Any:
    """TensorMeta for tensors (inside containers too); plain Python values as they are."""
    return pytree.tree_map_only(
        torch.Tensor, lambda t: TensorMeta(tuple(t.shape), t.dtype, bool(t.requires_grad)), value
    )


def _tensors_in(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def mutated_input(node: fx.Node) -> str | None:
    """Name of the value an in-place node updates (its first argument), else ``None``."""
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        inplace = node.target in _INPLACE_OPERATORS or bool(schema is not None and schema.is_mutable)
    elif node.op == "call_method":
        inplace = str(node.target).endswith("_") and not str(node.target).endswith("__")
    else:
        inplace = False
    first = node.args[0] if node.args else None
    if not (inplace and isinstance(first, fx.Node)):
        return None
    while _is_aten_view(first):  # ``x[:, 1:].copy_(y)`` (export: slice, then copy_) updates x itself
        first = first.args[0]
    return first.name


def _is_aten_view(node: fx.Node) -> bool:
    """An ATen op whose output aliases its first input without writing it (slice, select, view ...)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None or not schema.returns or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def _is_random(node: fx.Node) -> bool:
    """Draws random numbers: by name (fx-traced torch calls) or by ATen tag (torch.export ops)."""
    tags = getattr(node.target, "tags", ()) if node.op == "call_function" else ()
    if torch.Tag.nondeterministic_seeded in tags:
        return True
    name = _target_name(node).lower()
    return any(marker in name for marker in _RANDOM_MARKERS)


def _module_of(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if "merak_module" in node.meta:
        return node.meta["merak_module"].split(" (")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_export_path(path)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    return ""


def _clean_export_path(path: str) -> str:
    """``L['self'].transformer.h[0]`` / ``L__self___transformer_h_0`` style paths -> ``transformer.h.0``."""
    for prefix in ("L['self'].", "L['self']"):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def find_layers(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of repeated blocks: items of ``ModuleList``s of >= 2 modules of one class.

    Lists nested inside an item of another list (T5's per-block ``layer`` list) do not count,
    so the result is ``encoder.block.0 ... decoder.block.N`` for T5, ``transformer.h.*`` for GPT-2.
    """
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if any(name.startswith(layer + ".") for layer in found):
            continue
        found.extend(f"{name}.{i}" if name else str(i) for i in range(len(module)))
    return tuple(found)


def _layer_of(module_path: str, layers: Sequence[str], cache: dict[str, str | None]) -> str | None:
    if module_path in cache:
        return cache[module_path]
    result = None
    for layer in layers:
        if module_path == layer or module_path.startswith(layer + "."):
            result = layer
            break
    cache[module_path] = result
    return result


def annotate(traced: TracedGraph) -> ProxyGraph:
    """Run every node once on meta tensors under FlopCounterMode and build the ProxyGraph."""
    model = traced.model
    canonical = canonical_parameter_names(model)
    param_ids = {id(p) for p in model.parameters()}
    param_bytes: dict[str, int] = {}
    param_numel: dict[str, int] = {}
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = canonical[id(p)]
        param_bytes[key] = p.numel() * p.element_size()
        param_numel[key] = p.numel()
        groups.setdefault(key, []).append(name)
    tie_groups = {k: tuple(v) for k, v in groups.items() if len(v) > 1}
    layers = find_layers(model)
    layer_cache: dict[str, str | None] = {}
    module_state_cache: dict[int, dict[str, torch.Tensor]] = {}
    env: dict[fx.Node, Any] = {}
    nodes: list[ProxyNode] = []
    counter = FlopCounterMode(display=False)

    trace_devices = {torch.device(d) for d in traced.trace_devices}
    meta_device = torch.device("meta")

    def lookup(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return env[a]
        # torch.export bakes the trace device into ops; costs are computed on meta.
        return meta_device if isinstance(a, torch.device) and a in trace_devices else a

    with counter:
        for node in traced.graph.nodes:
            record = ProxyNode(
                name=node.name, op=node.op, target=_target_name(node), module=_module_of(node),
                role=COMPUTE, mutates=mutated_input(node),
                inputs=tuple(n.name for n in node.all_input_nodes), users=tuple(u.name for u in node.users),
            )
            if node.op == "output":
                record.role = OUTPUT
                nodes.append(record)
                continue
            args = fx.node.map_aggregate(node.args, lookup)
            kwargs = fx.node.map_aggregate(node.kwargs, lookup)
            before = counter.get_total_flops()
            if node.op == "placeholder":
                record.role = INPUT
                value = meta_like(traced.example_inputs[node.target])
            elif node.op == "get_attr":
                record.role = PARAM
                obj = traced.constants[node.target] if node.target in traced.constants else resolve_path(model, node.target)
                value = meta_like(obj)
                if isinstance(obj, torch.Tensor) and id(obj) in param_ids:
                    record.params = (canonical[id(obj)],)
            else:
                if node.op == "call_module":
                    module = model.get_submodule(node.target)
                    record.params = tuple(dict.fromkeys(canonical[id(p)] for p in module.parameters()))
                try:
                    value = _run_on_meta(node, args, kwargs, model, module_state_cache)
                except Exception as exc:
                    raise TraceError(f"cannot cost node {node.name} ({record.target}) of module "
                                     f"{record.module or 'the top level'} on meta tensors: "
                                     f"{type(exc).__name__}: {exc}") from exc
            env[node] = value
            record.flops = int(counter.get_total_flops() - before)
            record.meta = _describe(value)
            out_tensors = _tensors_in(value)
            in_tensors = _tensors_in((args, kwargs))
            record.output_bytes = _nbytes(out_tensors)
            record.param_bytes = sum(param_bytes[p] for p in record.params)
            record.requires_grad = any(t.requires_grad for t in out_tensors)
            record.sendable = isinstance(value, torch.Tensor) or not out_tensors
            if node.op in ("call_function", "call_method", "call_module"):
                # Views and metadata queries (x.shape, x.size()) move no data.
                moves_data = out_tensors and not all(t._is_view() for t in out_tensors)
                record.memory_bytes = _nbytes(in_tensors) + record.output_bytes if moves_data else 0
                record.memory_bytes += record.param_bytes if node.op == "call_module" else 0
            record.layer = _layer_of(record.module, layers, layer_cache) if layers else None
            nodes.append(record)
    _assign_replicated(traced.graph, nodes)
    return ProxyGraph(traced, nodes, param_bytes, param_numel, tie_groups, layers)


def _run_on_meta(node: fx.Node, args: tuple, kwargs: dict, model: nn.Module,
                 module_state_cache: dict[int, dict[str, torch.Tensor]]) -> Any:
    if node.op == "call_module":
        return run_module_on_meta(model.get_submodule(node.target), args, kwargs, module_state_cache)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def mutators_of(nodes: Sequence[ProxyNode]) -> dict[str, list[str]]:
    """Value name -> names of the nodes that update it in place, in execution order."""
    mutators: dict[str, list[str]] = {}
    for rec in nodes:
        if rec.mutates is not None:
            mutators.setdefault(rec.mutates, []).append(rec.name)
    return mutators


def _is_device_query(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] == "device"


def _assign_replicated(graph: fx.Graph, nodes: list[ProxyNode]) -> None:
    """Mark cheap values each stage can recompute itself as ``replicated``.

    A node is replicated when it reads no parameter, draws no random numbers, and all its inputs
    are batch inputs, buffers/constants, other replicated nodes or *light* compute values (Python
    values without tensors, e.g. ``hidden.shape[1]``; those are small enough to send). Every
    in-place mutation of a replicated node must be replicated too, else its final value depends
    on compute. ``x.device`` queries are replicated regardless of ``x``: a stage asks its own
    device. Iterates to a fixed point.
    """
    by_name = {n.name: n for n in nodes}
    fx_nodes = {n.name: n for n in graph.nodes}
    mutators = mutators_of(nodes)

    def base_ok(rec: ProxyNode) -> bool:
        node = fx_nodes[rec.name]
        return rec.op in ("call_function", "call_method", "call_module") and not rec.params and not _is_random(node)

    def light(rec: ProxyNode) -> bool:
        return rec.role == COMPUTE and not _tensors_in_meta(rec.meta)

    device_queries = {rec.name for rec in nodes if _is_device_query(fx_nodes[rec.name])}
    for name in device_queries:
        by_name[name].device_query = True
    candidates = {rec.name for rec in nodes if base_ok(rec)}
    changed = True
    while changed:
        changed = False
        for name in list(candidates):
            if name in device_queries:
                continue
            rec = by_name[name]
            ok = all(
                by_name[i].role == INPUT
                or (by_name[i].role == PARAM and not by_name[i].params)
                or i in candidates
                or light(by_name[i])
                for i in rec.inputs
            ) and all(m in candidates for m in mutators.get(name, ()))
            if not ok:
                candidates.discard(name)
                changed = True
    for name in candidates:
        by_name[name].role = REPLICATED


def _tensors_in_meta(meta: Any) -> bool:
    return any(isinstance(x, TensorMeta) for x in pytree.tree_leaves(meta, is_leaf=lambda x: isinstance(x, TensorMeta)))
