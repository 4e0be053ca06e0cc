"""Seconds per traced node on one tensor-parallel rank of a :class:`~merak.planner.cluster.Device`.

Why a cost model over the partitioner's proxy graph (and not per-layer formulas): the graph
already knows every node's FLOPs, bytes and output shape, the tensor-parallel planner
(:mod:`merak.runtime.tensor_parallel.plan`) already knows which nodes are sharded and how, and the sharder
(:func:`merak.partitioner.shard`) takes any :class:`~merak.partitioner.CostModel`. So the same
objects that train a model also price it on hardware it is not running on, and the partition is
balanced with the costs the simulator then uses.

The graph is traced once, at a small batch (usually 1 sequence) and fp32; :class:`RankCostModel`
scales it to the micro-batch (FLOPs, rows and activation bytes grow with the batch, parameter
bytes do not) and to the training precision (``byte_scale``), then, per node:

* matmul-like nodes (FLOPs > 0): the GEMM's dims come from the output shape (``n`` = last dim,
  ``m`` = the rest, ``k`` = FLOPs / 2mn); a column-parallel layer has ``n/tp``, a row-parallel one
  ``k/tp``, other sharded nodes (attention over heads) ``m/tp``; time from
  :meth:`Device.matmul_seconds` - smaller GEMMs run at lower efficiency;
* other nodes are bandwidth-bound (:meth:`Device.memory_seconds`, at the rate of their op class
  where the device was calibrated per class), divided by tp when sharded;
* backward (factors from the :class:`Device`): a layer with weights runs one GEMM for the input
  gradient (B) and one for the weight gradient (W), half of ``matmul_backward_factor`` x its
  forward each; other matmuls (attention) cost that factor x forward, all input gradient;
  bandwidth-bound nodes their backward rate (split B/W evenly when they hold weights, e.g.
  norms); nodes whose output needs no gradient cost nothing;
* a pipeline cut costs its activation and gradient bytes over ``link_bytes_per_s`` (the slowest
  link between neighbouring stages of the layout), so the sharder avoids cutting through
  attention, where several large tensors would cross.

Tensor-parallel communication (:func:`tp_layer_factors`): one repeated layer is cut into the
segments the sub-micro-batch runner executes (:func:`merak.runtime.tensor_parallel.overlap.layer_segments`),
and :func:`~merak.runtime.tensor_parallel.overlap.simulate_overlap` runs them with one compute and one
communication stream, ``k`` slices of the micro-batch, stacked three layers deep so the
steady state is measured (layer time = T(3 layers) - T(2 layers)). The ratio of that time to the
layer's pure compute becomes a factor on every node of every layer: comm exposure (``k = 1``:
all of it), the overlap of ``k > 1`` slices, and the lower efficiency of the slices' smaller
GEMMs are all in it. TP collectives outside the layers (vocab-parallel embedding) are added to
their nodes, exposed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from merak.partitioner.cost_model import CostModel, NodeCost
from merak.partitioner.proxy_graph import ProxyGraph, ProxyNode, TensorMeta
from merak.planner.cluster import Device, Link, op_class, ring_allreduce_seconds
from merak.runtime.tensor_parallel.overlap import Link as OverlapLink
from merak.runtime.tensor_parallel.overlap import Segment, layer_segments, simulate_overlap

__all__ = ["NodeTimes", "RankCostModel", "tp_layer_factors", "tp_boundary_extras", "is_sharded", "op_kinds",
           "TRACE_BYTES_PER_ELEMENT"]

#: The partitioner traces in fp32; byte counts in the graph are per fp32 element.
TRACE_BYTES_PER_ELEMENT = 4


@dataclasses.dataclass(frozen=True)
class NodeTimes:
    """One node's seconds per micro-batch on one rank: forward, input gradient, weight gradient."""

    forward: float
    backward_input: float
    backward_weight: float


def is_sharded(node: ProxyNode, tp_plan: Any) -> bool:
    """Whether the TP plan splits this node's work over the TP ranks (same rule as
    :func:`merak.runtime.tensor_parallel.overlap.layer_segments`)."""
    if tp_plan is None or tp_plan.tp <= 1:
        return False
    return node.name in tp_plan.layouts or tp_plan.style(node.target) != "replicate"


def _gemm_dims(node: ProxyNode) -> tuple[float, float, float]:
    """(m, n, k) of one GEMM a matmul-like node runs, read off its output shape: a layer with
    weights multiplies all its rows by one weight (``m`` = every dim but the last); a batched
    matmul (attention) runs one GEMM per leading index (``m`` = the second-to-last dim)."""
    meta = node.meta
    if isinstance(meta, TensorMeta) and meta.shape:
        n = float(meta.shape[-1])
        numel = float(math.prod(meta.shape))
        batched = not node.params and len(meta.shape) >= 3
        m = float(meta.shape[-2]) if batched else numel / max(n, 1.0)
    else:
        numel = max(node.output_bytes / TRACE_BYTES_PER_ELEMENT, 1.0)
        n = m = math.sqrt(numel)
    numel = max(numel, 1.0)
    return max(m, 1.0), max(n, 1.0), node.flops / (2.0 * numel)


def op_kinds(graph: ProxyGraph) -> dict[str, str]:
    """Node name -> op class (:func:`merak.planner.cluster.op_class`) of every compute node: the
    function or method name, or the module's class name."""
    out = {}
    for node in graph.nodes:
        if node.op == "call_module":
            name = type(graph.model.get_submodule(node.target)).__name__
        elif node.op in ("call_function", "call_method"):
            name = node.target.split(".")[-1]
        else:
            continue
        out[node.name] = op_class(name)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class RankCostModel(CostModel):
    """Per-node seconds on one TP rank of ``device`` (see the module docstring).

    ``batch_scale`` = micro-batch / traced batch; ``byte_scale`` = training bytes per element /
    traced bytes per element (0.5 for bf16 over an fp32 trace); ``layer_factors`` = per repeated
    layer, (forward, backward) multipliers for TP communication (:func:`tp_layer_factors`);
    ``extras`` = per node name, (forward, backward) seconds added (TP collectives outside layers);
    ``op_kinds`` = node name -> op class, for devices with calibrated per-class rates (:func:`op_kinds`).
    """

    device: Device
    batch_scale: float = 1.0
    byte_scale: float = 0.5
    tp: int = 1
    tp_plan: Any = None
    link_bytes_per_s: float | None = None
    op_kinds: Mapping[str, str] = dataclasses.field(default_factory=dict)
    layer_factors: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    extras: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    name = "cluster"

    def sharded(self, node: ProxyNode) -> bool:
        return self.tp > 1 and is_sharded(node, self.tp_plan)

    def _moved(self, node: ProxyNode) -> float:
        """Bytes the node reads and writes on this rank at the micro-batch and precision."""
        tp = self.tp if self.sharded(node) else 1
        return ((node.memory_bytes - node.param_bytes) * self.batch_scale + node.param_bytes) * self.byte_scale / tp

    def forward_seconds(self, node: ProxyNode) -> float:
        """Forward time of ``node`` on this rank, without TP communication."""
        tp = self.tp if self.sharded(node) else 1
        moved = self._moved(node)
        if node.flops <= 0:
            return self.device.memory_seconds(moved, self.op_kinds.get(node.name))
        m, n, k = _gemm_dims(node)
        m *= self.batch_scale
        if tp > 1:
            style = self.tp_plan.style(node.target) if node.op == "call_module" else "replicate"
            if style == "column" or style == "vocab":
                n /= tp
            elif style == "row":
                k /= tp
            else:
                m /= tp
        return self.device.matmul_seconds(node.flops * self.batch_scale / tp, m, n, k, moved)

    def node_times(self, node: ProxyNode) -> NodeTimes:
        """Forward, input-gradient and weight-gradient seconds, TP communication included."""
        forward = self.forward_seconds(node)
        if not node.requires_grad:
            back = 0.0
        elif node.flops > 0:
            back = self.device.matmul_backward_factor * forward
        else:
            back = self.device.memory_seconds(self._moved(node), self.op_kinds.get(node.name), backward=True)
        bi, bw = (back / 2, back / 2) if node.params else (back, 0.0)
        f_factor, b_factor = self.layer_factors.get(node.layer, (1.0, 1.0)) if node.layer else (1.0, 1.0)
        f_extra, b_extra = self.extras.get(node.name, (0.0, 0.0))
        return NodeTimes(forward * f_factor + f_extra, bi * b_factor + b_extra, bw * b_factor)

    def node_cost(self, node: ProxyNode) -> NodeCost:
        t = self.node_times(node)
        return NodeCost(t.forward, t.backward_input + t.backward_weight)

    def transfer_cost(self, nbytes: int) -> float:
        if not self.link_bytes_per_s:
            return 0.0
        return nbytes * self.batch_scale * self.byte_scale / self.link_bytes_per_s

    def describe(self) -> str:
        return (f"RankCostModel({self.device.name}, batch x{self.batch_scale:g}, bytes x{self.byte_scale:g}, "
                f"tp={self.tp})")


class _SliceCostModel(CostModel):
    """Adapter for :func:`layer_segments`, which divides sharded nodes by tp and whose segments
    :func:`simulate_overlap` divides by k: hand it ``k * tp`` x a slice's per-rank time, so that
    what comes out is the slice's time with its own (smaller-GEMM) efficiency."""

    def __init__(self, base: RankCostModel, k: int) -> None:
        self.base, self.k = base, k

    def node_cost(self, node: ProxyNode) -> NodeCost:
        t = self.base.node_times(node)
        scale = self.k * (self.base.tp if self.base.sharded(node) else 1)
        return NodeCost(t.forward * scale, (t.backward_input + t.backward_weight) * scale)


def _overlap_link(tp: int, intra: Link) -> OverlapLink:
    """tp_overlap's link charging one latency per collective: make it the ring's 2(n-1) steps."""
    return OverlapLink(tp, intra.bytes_per_s, 2 * (tp - 1) * intra.latency_s)


def _steady_layer_seconds(segments: list[Segment], k: int, link: OverlapLink) -> float:
    three = simulate_overlap(segments * 3, k, link, launch_overhead_s=0.0).seconds
    two = simulate_overlap(segments * 2, k, link, launch_overhead_s=0.0).seconds
    return three - two


def tp_layer_factors(graph: ProxyGraph, base: RankCostModel, k: int, intra: Link) -> tuple[float, float]:
    """(forward, backward) time of a representative repeated layer with TP communication and
    ``k`` sub-micro-batches, over its pure compute on one rank (see the module docstring).
    ``base`` prices the full micro-batch without TP communication; ``1.0, 1.0`` without TP."""
    if base.tp <= 1 or not graph.layers:
        return 1.0, 1.0
    if k < 1:
        raise ValueError(f"tp_sub_microbatches={k} must be >= 1")
    layer = graph.layers[len(graph.layers) // 2]
    link = _overlap_link(base.tp, intra)
    slice_model = _SliceCostModel(dataclasses.replace(base, batch_scale=base.batch_scale / k), k)
    full_model = _SliceCostModel(base, 1)
    comm_scale = base.batch_scale * base.byte_scale
    factors = []
    for backward in (False, True):
        segments = [dataclasses.replace(s, comm_bytes=int(s.comm_bytes * comm_scale))
                    for s in layer_segments(graph, base.tp_plan, slice_model, layer, backward)]
        compute = sum(s.compute_s for s in layer_segments(graph, base.tp_plan, full_model, layer, backward))
        factors.append(_steady_layer_seconds(segments, k, link) / compute if compute > 0 else 1.0)
    return factors[0], factors[1]


def tp_boundary_extras(graph: ProxyGraph, base: RankCostModel, intra: Link) -> dict[str, tuple[float, float]]:
    """Exposed TP collectives outside the repeated layers, per node: the forward all-reduce after a
    row-parallel layer or vocab-parallel embedding, the backward all-reduce (``copy``) or
    all-gather (``scatter``) of a value's gradient."""
    plan = base.tp_plan
    if base.tp <= 1 or plan is None:
        return {}
    n = base.tp
    scale = base.batch_scale * base.byte_scale
    extras: dict[str, list[float]] = {}
    by_name = graph.by_name
    for node in graph.nodes:
        if node.layer is None and node.op == "call_module" and plan.style(node.target) in ("row", "vocab"):
            t = ring_allreduce_seconds(node.output_bytes * scale, n, intra.bytes_per_s, intra.latency_s)
            extras.setdefault(node.name, [0.0, 0.0])[0] += t
    for ins in {(i.value, i.kind) for i in plan.inserts}:
        value, kind = ins
        node = by_name.get(value)
        if node is None or node.layer is not None:
            continue
        nbytes = node.output_bytes * scale
        t = ring_allreduce_seconds(nbytes, n, intra.bytes_per_s, intra.latency_s)
        extras.setdefault(value, [0.0, 0.0])[1] += t if kind == "copy" else t / 2
    return {k: (v[0], v[1]) for k, v in extras.items()}
