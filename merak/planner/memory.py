"""Memory per device of a pipeline stage, for the cluster simulator.

Why not call the runtime's estimator (:func:`merak.runtime.memory.estimator.estimate_memory`) directly: it
prices one layout traced at its own micro-batch, while a search prices hundreds of layouts from
one trace. So this module takes the estimator's source of truth - what autograd saves per node,
recorded by one meta forward of the graph at the training precision
(:func:`merak.runtime.memory.activation_profile.profile_saved_tensors`, checked against real runs within
10 %) - once per model, and combines it per stage with plain arithmetic that scales with the
micro-batch and the TP degree:

* parameters, gradients and optimizer states: ``params x (weight + grad + optimizer bytes)``
  per the system's :class:`Precision`, optimizer states divided by dp under ZeRO-1;
  TP-sharded weights count ``1/tp``;
* activations of one micro-batch (:class:`StageFootprint`): everything the stage's nodes save
  (``kept``), what stays when every layer is recomputed (``recompute``: the saves outside any
  layer and the layers' inputs) or only its attention core is (``selective``, the cores
  delimited as the executor delimits them, :func:`merak.runtime.memory.layer_graph.attention_cores`),
  and the values it receives; values of TP-sharded nodes count ``1/tp``;
* the schedule decides how many micro-batches hold what (:func:`holder_profile`, the accounting
  of ``merak.runtime.pipeline.schedules.memory``): at each instruction of a stage's list, how many
  recomputed micro-batches hold their reduced set (forward done, RECOMPUTE not yet), how many
  hold their materialized set (from RECOMPUTE to the end of their backward), and how many
  others keep everything. Merak's runtime re-materializes a stage's recomputed part at once
  (``stage``); per-layer checkpointing (DeepSpeed, Megatron-LM) only one layer at a time
  (``layer``, ``selective``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np

from merak.partitioner.sharding import PartitionPlan
from merak.runtime.memory.activation_profile import profile_saved_tensors
from merak.planner.cost import TRACE_BYTES_PER_ELEMENT, is_sharded
from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.memory.layer_graph import attention_cores
from merak.runtime.pipeline.schedules.memory import FREEING_OPS

__all__ = ["Precision", "StageFootprint", "StageMemory", "attention_core_nodes", "holder_profile", "stage_footprints",
           "stage_memory"]

#: Instructions during which a recomputed micro-batch's activations are all present.
_MATERIALIZING = frozenset({Op.RECOMPUTE, Op.BACKWARD, Op.BACKWARD_INPUT})


@dataclasses.dataclass(frozen=True)
class Precision:
    """Bytes per parameter of the weights, their gradients (also what the DP all-reduce moves)
    and the optimizer states, bytes per activation element (2: 16-bit compute, 4: fp32), and
    whether 16-bit compute is autocast over fp32 weights.

    Merak's runtime keeps fp32 weights as Adam's master copy and autocasts compute (4 + 4 + 8,
    ``autocast=True``: autograd then saves a mix of fp32 and bf16 tensors - both the fp32 input
    and its bf16 cast in places - as the runtime's estimator records); DeepSpeed's fp16/bf16
    engine keeps 16-bit weights and gradients plus an fp32 master copy and the moments
    (2 + 2 + 12) and Megatron-LM accumulates and reduces bf16 gradients in fp32 (2 + 4 + 12);
    both run the model in 16 bits (``autocast=False``: saved tensors are 16-bit).
    """

    weight_bytes: int = 4
    grad_bytes: int = 4
    optimizer_bytes: int = 8
    activation_bytes: int = 2
    autocast: bool = True

    @property
    def byte_scale(self) -> float:
        """Training bytes per element over the trace's (fp32)."""
        return self.activation_bytes / TRACE_BYTES_PER_ELEMENT

    @property
    def profile(self) -> tuple[str, float]:
        """The runtime's precision name whose saved-tensor profile to read, and the factor on it."""
        if self.autocast and self.activation_bytes == 2:
            return "bf16", 1.0
        return "fp32", self.byte_scale


@dataclasses.dataclass(frozen=True)
class StageFootprint:
    """One device of a stage: its parameters, and per traced micro-batch the bytes it holds
    between forward and backward when all its layers keep / recompute / recompute their
    attention core (the values it received included: the executor holds them to the backward;
    storages shared between saved tensors and received values count once), and the backward's
    transient workspace (the gradient of the stage's largest value plus the output gradients it
    receives), as the runtime's estimator counts them."""

    params: int
    kept_bytes: float
    recompute_bytes: float
    selective_bytes: float
    workspace_bytes: float
    layers: int


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Estimated peak bytes on one device of a stage (issue 7's per-stage JSON fields)."""

    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    workspace_bytes: float
    recompute_fraction: float

    @property
    def total_bytes(self) -> float:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes
                + self.workspace_bytes)

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self) | {"total_bytes": self.total_bytes}


def attention_core_nodes(graph: Any) -> frozenset[str]:
    """Names of the nodes inside attention cores (Megatron's selective recomputation)."""
    fx_nodes = {n.name: n for n in graph.graph.nodes}
    nodes = [fx_nodes[n.name] for n in graph.compute_nodes]
    return frozenset(n.name for a, b in attention_cores(nodes, 0, len(nodes) - 1) for n in nodes[a:b + 1])


def _param_share(name: str, tp_plan: Any) -> float:
    """Fraction of parameter ``name`` on one TP rank (row-parallel biases stay replicated)."""
    if tp_plan is None or tp_plan.tp <= 1:
        return 1.0
    module, _, leaf = name.rpartition(".")
    style = tp_plan.style(module)
    if style == "replicate" or (style == "row" and leaf == "bias"):
        return 1.0
    return 1.0 / tp_plan.tp


def stage_footprints(plan: PartitionPlan, precision: Precision, tp_plan: Any = None,
                     cores: Collection[str] = frozenset()) -> list[StageFootprint]:
    """Every stage's :class:`StageFootprint` (bytes at the traced batch and ``precision``)."""
    graph = plan.graph
    name, scale = precision.profile
    profile = profile_saved_tensors(graph, name)
    tp = tp_plan.tp if tp_plan is not None else 1
    sharded = frozenset(n.name for n in graph.nodes if is_sharded(n, tp_plan))
    by_name = graph.by_name

    def saved(names: Iterable[str]) -> frozenset[int]:
        return frozenset().union(*(profile.saved.get(n, frozenset()) for n in names))

    def values(names: Iterable[str]) -> frozenset[int]:
        return frozenset().union(*(profile.value_keys(n) for n in names))

    def nbytes(keys: Iterable[int]) -> float:
        return float(profile.nbytes(keys, sharded, tp)) * scale

    def inputs_from_outside(names: Sequence[str]) -> list[str]:
        inside = set(names)
        return [i for n in names for i in by_name[n].inputs if i not in inside and by_name[i].is_tensor]

    out = []
    for s in range(plan.num_stages):
        nodes = plan.stage_nodes(s)
        names = [n.name for n in nodes]
        layers = list(dict.fromkeys(n.layer for n in nodes if n.layer is not None))
        outside = saved(n.name for n in nodes if n.layer is None)
        layer_inputs = values(i for layer in layers
                              for i in inputs_from_outside([n.name for n in nodes if n.layer == layer]))
        core_names = [n for n in names if n in cores]
        selective = saved(n for n in names if n not in cores) | values(inputs_from_outside(core_names))
        held = values(plan.recv_inputs(s)) | values(plan.send_outputs(s))  # kept by the executor to the backward
        largest = max((nbytes(profile.value_keys(n)) for n in names), default=0.0)
        params = sum(graph.param_numel[p] * _param_share(p, tp_plan) for p in plan.stage_parameters(s))
        out.append(StageFootprint(
            params=int(params), kept_bytes=nbytes(saved(names) | held),
            recompute_bytes=nbytes(outside | layer_inputs | held), selective_bytes=nbytes(selective | held),
            workspace_bytes=largest + nbytes(values(plan.send_outputs(s))), layers=len(layers),
        ))
    return out


def holder_profile(ops: Sequence[Instruction], recomputed: Collection[Any] | None = None,
                   num_chunks: int = 1) -> np.ndarray:
    """Per instruction of a stage's list, ``(reduced, materialized, kept)`` micro-batch counts
    (rows; see the module docstring). ``recomputed`` defaults to the micro-batches with a
    RECOMPUTE in ``ops``; passing every micro-batch prices a plan on its schedule without
    recomputation (a recomputed micro-batch is then materialized from its backward).

    With virtual stages (``num_chunks`` per rank) state is per ``(chunk, micro-batch)`` and a
    chunk counts ``1/num_chunks`` of a micro-batch (the chunks of a rank are taken as equal
    shares of its footprint, as the simulator takes them for time); ``recomputed`` may hold
    micro-batch numbers (every chunk) or ``(chunk, micro-batch)`` keys.
    """
    if recomputed is None:
        recomputed = {i.key for i in ops if i.op is Op.RECOMPUTE}
    weight = 1.0 / num_chunks
    state: dict[tuple[int, int], int] = {}  # (chunk, micro-batch) -> 0 reduced, 1 materialized, 2 kept
    rows = []
    for ins in ops:
        key = ins.key if ins.microbatch is not None else None
        if ins.op is Op.FORWARD:
            state[key] = 0 if (key in recomputed or ins.microbatch in recomputed) else 2
        elif ins.op in _MATERIALIZING and state.get(key) == 0:
            state[key] = 1
        counts = [0.0, 0.0, 0.0]
        for v in state.values():
            counts[v] += weight
        rows.append(counts)
        if ins.op in FREEING_OPS:
            state.pop(key, None)
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def stage_memory(
    footprint: StageFootprint,
    *,
    fraction: float,
    holders: np.ndarray,
    batch_scale: float,
    precision: Precision,
    mode: str = "stage",
    dp: int = 1,
    zero1: bool = False,
) -> StageMemory:
    """Peak memory of one device of a stage.

    ``holders`` = :func:`holder_profile` of the stage's instruction list; ``fraction`` of its
    layers is recomputed; ``mode`` is ``stage``, ``layer`` or ``selective`` (see the module docstring).
    """
    if mode not in ("stage", "layer", "selective"):
        raise ValueError(f"unknown recomputation granularity {mode!r}")
    kept = footprint.kept_bytes * batch_scale
    layers = max(footprint.layers, 1)
    if fraction <= 0:
        reduced = materialized = kept
    elif mode == "selective":
        dropped = kept - footprint.selective_bytes * batch_scale
        reduced, materialized = kept - dropped, kept - dropped + dropped / layers
    else:
        dropped = fraction * (kept - footprint.recompute_bytes * batch_scale)
        reduced = kept - dropped
        materialized = kept if mode == "stage" else reduced + dropped / layers
    weights = np.array([reduced, materialized, kept])
    activations = float(np.max(holders @ weights)) if len(holders) else 0.0
    params = footprint.params
    return StageMemory(
        params_bytes=params * precision.weight_bytes,
        grads_bytes=params * precision.grad_bytes,
        optimizer_bytes=params * precision.optimizer_bytes / (dp if zero1 else 1),
        activation_bytes=activations,
        workspace_bytes=footprint.workspace_bytes * batch_scale,
        recompute_fraction=fraction,
    )
