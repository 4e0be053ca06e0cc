"""Regroup a stage's fx graph so that chosen node ranges (layers, attention cores) run as one call.

Why a regrouped copy of the graph: a per-layer activation action (recompute, offload) must wrap
*one callable per layer* - the checkpoint needs the layer's inputs to re-run it, the offload
hooks must be active exactly while the layer runs. A stage graph is flat (one node per op, the
layer a node came from recorded in its meta by the tracer), so each chosen range is cut out as
its own ``GraphModule`` whose placeholders are the values the range reads from outside and whose
output is the tuple of values used after it, and a *driver* graph calls it in the range's place.

Both are generated code (no per-node interpretation), and both reference the stage's own
modules and tensors (nothing copied), so parameters, their gradients, zero-bubble's patched
``forward`` methods and tensor-parallel layers are the stage's. The stage itself is not
modified: its graph, parameter names and ``state_dict`` stay as they are, and a micro-batch
that applies no action still runs the stage's own ``forward``.

Layer of a node: the module path the tracer recorded (``transformer.h.3.attn`` ->
``transformer.h.3``), the same rule that gives ``ProxyNode.layer``. A layer's range runs from
its first to its last computing node (``get_attr`` nodes, which torch.export hoists to the top,
do not count: a region reads them as inputs); nodes without a layer inside that range (e.g.
inserted tensor-parallel copies) belong to it.

Attention core (for ``selective``): a ``scaled_dot_product_attention`` call, or, in eager
attention, the range from the matmul feeding a softmax (scores = q·kᵀ) to the matmul consuming
it (probabilities·v) - scaling, mask, softmax, cast and dropout in between - which is what
Megatron's selective recomputation recomputes: the tensors of size sequence² per head.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import fx, nn

from merak.partitioner.proxy_graph import _layer_of, _module_of, mutated_input
from merak.partitioner.tracer import resolve_path

__all__ = ["Region", "layer_ranges", "attention_cores", "build_program", "LayerGraphError"]

_SDPA = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_cudnn_attention")
_MATMUL = ("matmul", "bmm", "baddbmm", "einsum")
_SOFTMAX = ("softmax", "_softmax", "_safe_softmax")


class LayerGraphError(ValueError):
    """A range of the stage graph cannot run as one recomputable call."""


@dataclass(frozen=True)
class Region:
    """Nodes ``start..end`` (inclusive positions in the stage graph) that run as one call."""

    label: str
    start: int
    end: int


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return ""
    if node.target is operator.matmul:
        return "matmul"
    name = getattr(node.target, "__name__", None) or str(node.target)
    return name.split(".")[0]  # aten overloads: "softmax.int" -> "softmax"


def layer_ranges(nodes: Sequence[fx.Node], layers: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{layer: (first, last)}`` node positions of each of ``layers`` that occurs in ``nodes``."""
    cache: dict[str, str | None] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for i, node in enumerate(nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            continue  # a get_attr may sit anywhere (torch.export hoists them); read from outside, it costs nothing
        layer = _layer_of(_module_of(node), layers, cache)
        if layer is not None:
            first, _ = ranges.get(layer, (i, i))
            ranges[layer] = (first, i)
    spans = sorted((r, name) for name, r in ranges.items())
    for (a, name_a), (b, name_b) in zip(spans, spans[1:]):
        if b[0] <= a[1]:
            raise LayerGraphError(f"layers {name_a} and {name_b} interleave in the stage graph, so neither runs as "
                                  "one call; keep one of them (action 'keep')")
    return ranges


def attention_cores(nodes: Sequence[fx.Node], start: int, end: int) -> list[tuple[int, int]]:
    """Positions ``(first, last)`` of each attention core between ``start`` and ``end``."""
    position = {n: i for i, n in enumerate(nodes)}

    def inside(n: fx.Node) -> bool:
        return n in position and start <= position[n] <= end

    cores = []
    for i in range(start, end + 1):
        node = nodes[i]
        name = _op_name(node)
        if name in _SDPA:
            cores.append((i, i))
        elif name in _SOFTMAX:
            scores = _nearest(node, lambda n: n.all_input_nodes, inside)
            output = _nearest(node, lambda n: list(n.users), inside)
            if scores is not None and output is not None:
                cores.append((position[scores], position[output]))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(cores):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def _nearest(node: fx.Node, step: Callable[[fx.Node], list[fx.Node]], inside: Callable[[fx.Node], bool],
             limit: int = 8) -> fx.Node | None:
    """Breadth-first from ``node`` (``step`` = inputs or users), the closest matmul-like node."""
    frontier, seen = [node], {node}
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for m in step(n):
                if m in seen or not inside(m):
                    continue
                if _op_name(m) in _MATMUL:
                    return m
                seen.add(m)
                nxt.append(m)
        frontier = nxt
    return None


def _boundary(nodes: Sequence[fx.Node], region: Region) -> tuple[list[fx.Node], list[fx.Node]]:
    """(values read from before the region, values of the region used after it)."""
    body = set(nodes[region.start:region.end + 1])
    inputs: dict[fx.Node, None] = {}
    for node in nodes[region.start:region.end + 1]:
        for inp in node.all_input_nodes:
            if inp not in body:
                inputs[inp] = None
        mutated = mutated_input(node)
        if mutated is not None and any(inp.name == mutated for inp in inputs):
            raise LayerGraphError(f"{region.label}: node {node.name} updates its input {mutated} in place, so a "
                                  "recomputation would read the updated value; keep this layer (action 'keep')")
    outputs = [n for n in nodes[region.start:region.end + 1] if any(u not in body for u in n.users)]
    return list(inputs), outputs


def _region_module(stage: nn.Module, nodes: Sequence[fx.Node], region: Region,
                   inputs: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(n.name) for n in inputs}
    for node in nodes[region.start:region.end + 1]:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(stage, graph, class_name="Region")


def build_program(stage: fx.GraphModule, regions: Sequence[Region],
                  wrap: Callable[[Region, fx.GraphModule], nn.Module]) -> fx.GraphModule:
    """A module computing what ``stage`` computes, each region run by ``wrap(region, module)``.

    ``regions`` must not overlap. The result shares every module and tensor with ``stage``.
    """
    nodes = list(stage.graph.nodes)
    starts = {r.start: r for r in regions}
    driver = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root: dict[str, object] = {}
    i = 0
    while i < len(nodes):
        region = starts.get(i)
        if region is None:
            env[nodes[i]] = driver.node_copy(nodes[i], env.__getitem__)
            if nodes[i].op in ("call_module", "get_attr"):
                root[str(nodes[i].target)] = resolve_path(stage, str(nodes[i].target))
            i += 1
            continue
        inputs, outputs = _boundary(nodes, region)
        target = f"_merak_region_{len([k for k in root if k.startswith('_merak_region_')])}"
        root[target] = wrap(region, _region_module(stage, nodes, region, inputs, outputs))
        call = driver.call_module(target, tuple(env[n] for n in inputs))
        for j, out in enumerate(outputs):
            env[out] = driver.call_function(operator.getitem, (call, j))
        i = region.end + 1
    return fx.GraphModule(root, driver, class_name="RegionDriver")

