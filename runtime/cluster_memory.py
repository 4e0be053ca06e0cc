"""Memory per device of a pipeline stage, for the cluster simulator.

Why here and not only in the runtime's estimator: the simulator prices layouts it never builds,
from a graph traced once at a small batch, for any micro-batch size, tp degree and precision.
What it needs per stage is small and additive, so it is computed straight from the partition
plan (:class:`StageFootprint`) and combined with the schedule's in-flight counts
(:func:`stage_memory`). This is the one place the simulator's memory numbers come from - the
adapter point for the runtime's estimator (``merak.runtime.memory``, issue 7) when its figures
can be produced for an arbitrary micro-batch and tp without retracing.

Accounting, per device of stage ``s`` (bytes):

* parameters, gradients and optimizer states: ``params x (weight + grad + optimizer bytes)``,
  optimizer states divided by dp under ZeRO-1; TP-sharded weights count ``1/tp``;
* activations: a micro-batch keeps ``kept_bytes`` (outputs of the stage's nodes that autograd
  needs, the partitioner's own ``activation_bytes`` rule, scaled to the micro-batch and the
  training precision, sharded nodes ``1/tp``) plus its received input; the schedule decides how
  many are alive at once (the caller passes ``merak.runtime.schedules.memory.peak_activations``,
  which knows that a recomputed micro-batch keeps ``1 - fraction`` of its activations until its
  RECOMPUTE);
  recomputed layers keep their inputs (checkpoints) for every micro-batch in flight. With
  per-layer checkpointing (DeepSpeed, Megatron) only one layer is re-materialized at a time,
  not the whole stage (Merak's runtime recomputes the stage's recomputed part in one go);
* Megatron's ``selective`` recomputation drops only the attention core (``attention_core_bytes``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from merak.partitioner.proxy_graph import COMPUTE, ProxyNode
from merak.partitioner.sharding import PartitionPlan
from merak.runtime.cluster_cost import TRACE_BYTES_PER_ELEMENT, is_sharded

__all__ = ["Precision", "StageFootprint", "StageMemory", "stage_footprints", "stage_memory"]


@dataclasses.dataclass(frozen=True)
class Precision:
    """Bytes per parameter of the weights, their gradients (also what the DP all-reduce moves)
    and the optimizer states, and bytes per activation element.

    Merak's runtime keeps fp32 weights as Adam's master copy and autocasts compute (4 + 4 + 8);
    DeepSpeed's fp16/bf16 engine keeps 16-bit weights and gradients plus an fp32 master copy and
    the moments (2 + 2 + 12); Megatron-LM accumulates and reduces bf16 gradients in fp32 (2 + 4 + 12).
    """

    weight_bytes: int = 4
    grad_bytes: int = 4
    optimizer_bytes: int = 8
    activation_bytes: int = 2

    @property
    def byte_scale(self) -> float:
        return self.activation_bytes / TRACE_BYTES_PER_ELEMENT


@dataclasses.dataclass(frozen=True)
class StageFootprint:
    """Per stage, per device, per micro-batch of the traced shape (scale with the batch)."""

    params: int
    kept_bytes: float
    attention_core_bytes: float
    layer_input_bytes: float
    recv_bytes: float
    layers: int


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Estimated peak bytes on one device of a stage (issue 7's per-stage JSON fields)."""

    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    recompute_fraction: float

    @property
    def total_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self) | {"total_bytes": self.total_bytes}


def is_attention_core(node: ProxyNode) -> bool:
    """A node of Megatron's selective recomputation: inside a layer, no weights, a per-head
    (4-d or more) output - attention scores, softmax, dropout, attention x values."""
    meta = node.meta
    return (node.layer is not None and not node.params and node.memory_bytes > 0
            and getattr(meta, "shape", None) is not None and len(meta.shape) >= 4)


def _saved(node: ProxyNode) -> bool:
    return node.requires_grad and node.memory_bytes > 0


def _param_share(name: str, tp_plan: Any) -> float:
    """Fraction of parameter ``name`` on one TP rank (row-parallel biases stay replicated)."""
    if tp_plan is None or tp_plan.tp <= 1:
        return 1.0
    module, _, leaf = name.rpartition(".")
    style = tp_plan.style(module)
    if style == "replicate" or (style == "row" and leaf == "bias"):
        return 1.0
    return 1.0 / tp_plan.tp


def stage_footprints(plan: PartitionPlan, tp_plan: Any = None) -> list[StageFootprint]:
    """What each stage of ``plan`` holds on one device, per traced micro-batch, in trace bytes."""
    graph = plan.graph
    tp = tp_plan.tp if tp_plan is not None else 1
    layer_inputs = _layer_input_bytes(graph)
    out = []
    for s in range(plan.num_stages):
        nodes = plan.stage_nodes(s)
        params = sum(graph.param_numel[p] * _param_share(p, tp_plan) for p in plan.stage_parameters(s))
        div = [tp if is_sharded(n, tp_plan) else 1 for n in nodes]
        kept = sum(n.output_bytes / d for n, d in zip(nodes, div) if _saved(n))
        core = sum(n.output_bytes / d for n, d in zip(nodes, div) if _saved(n) and is_attention_core(n))
        layers = list(dict.fromkeys(n.layer for n in nodes if n.layer is not None))
        recv = plan.stages[s - 1].send_bytes if s > 0 else 0
        out.append(StageFootprint(int(params), kept, core, sum(layer_inputs.get(name, 0) for name in layers),
                                  float(recv), len(layers)))
    return out


def _layer_input_bytes(graph: Any) -> dict[str, int]:
    """Per repeated layer, bytes of the tensors it reads from outside itself that need a gradient
    (the hidden state a checkpoint keeps)."""
    by_name = graph.by_name
    seen: dict[str, set[str]] = {}
    for node in graph.nodes:
        if node.layer is None or node.role != COMPUTE:
            continue
        for i in node.inputs:
            src = by_name[i]
            if src.layer != node.layer and src.role == COMPUTE and src.is_tensor and src.requires_grad:
                seen.setdefault(node.layer, set()).add(i)
    return {layer: sum(by_name[i].output_bytes for i in names) for layer, names in seen.items()}


def stage_memory(
    footprint: StageFootprint,
    *,
    fraction: float,
    peak: float,
    inflight: int,
    batch_scale: float,
    precision: Precision,
    mode: str = "stage",
    dp: int = 1,
    zero1: bool = False,
) -> StageMemory:
    """Peak memory of one device of a stage whose schedule holds at most ``inflight``
    micro-batches and ``peak`` micro-batches' worth of saved activations at once (both from the
    stage's instruction list: ``peak_inflight`` and ``peak_activations(ops, fraction)``).

    ``fraction`` of the stage's layers is recomputed; ``mode`` is ``"stage"`` (Merak's runtime:
    the recomputed part is re-materialized at once), ``"layer"`` (per-layer checkpointing) or
    ``"selective"`` (only the attention core is dropped, per layer).
    """
    if mode not in ("stage", "layer", "selective"):
        raise ValueError(f"unknown recomputation granularity {mode!r}")
    act_scale = batch_scale * precision.byte_scale
    kept = footprint.kept_bytes * act_scale
    recv = footprint.recv_bytes * act_scale * inflight
    layers = max(footprint.layers, 1)
    if mode == "selective":
        core = footprint.attention_core_bytes * act_scale
        activations = (kept - core) * inflight + core / layers if fraction > 0 else kept * inflight
    else:
        if mode == "layer" and fraction > 0 and peak >= 1.0:
            peak -= fraction * (1.0 - 1.0 / layers)  # one layer re-materialized, not the stage
        checkpoints = fraction * footprint.layer_input_bytes * act_scale * inflight
        activations = kept * peak + checkpoints
    params = footprint.params
    return StageMemory(
        params_bytes=params * precision.weight_bytes,
        grads_bytes=params * precision.grad_bytes,
        optimizer_bytes=params * precision.optimizer_bytes / (dp if zero1 else 1),
        activation_bytes=activations + recv,
        recompute_fraction=fraction,
    )
