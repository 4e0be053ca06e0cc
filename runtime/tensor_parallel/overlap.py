"""A model of sub-pipelined tensor parallelism: how much of the TP all-reduce time the
sub-micro-batch interleaving of :mod:`.tp_interleave` hides, on a given device and link.

Why a model: the overlap only pays where a collective runs on its own engine beside the
compute (NCCL on GPUs); on a 2-core CPU the gloo thread competes with the compute for cores.
Predicting the gain on an 8-GPU node from the traced graph lets the choice of
``tp_sub_microbatches`` be made (and checked) without the node.

Model, per TP rank (all ranks are symmetric):

* the graph is cut into **segments** at the TP collectives, exactly where the runner cuts it:
  forward after each row-parallel layer / vocab-parallel embedding (all-reduce of its output),
  backward at each ``copy`` (all-reduce of the input gradient) and ``scatter`` (all-gather);
* a segment's compute time is the partitioner's roofline cost of its nodes
  (:class:`~merak.partitioner.FlopCostModel`), divided by tp for nodes that are sharded, plus a
  kernel-launch overhead per node and per sub-micro-batch (what splitting costs);
* a collective of ``b`` bytes over ``n`` ranks takes ``latency + b * 2(n-1)/n / bus_bandwidth``
  (ring all-reduce; an all-gather or all-to-all moves half of that), on one communication
  stream, in launch order; a mixture-of-experts bank is a cut in both directions
  (:func:`moe_comm`: an all-reduce in ``tensor`` mode, all-to-alls + all-gather in ``expert`` mode);
* one compute stream runs the runner's order: segment s for sub-micro-batch 0..k-1, then s+1;
  sub-micro-batch j's segment s+1 starts after its collective of segment s has finished. While a
  collective is in flight, compute is slowed by ``interference`` (NCCL kernels occupy SMs).

``k = 1`` is the plain schedule: every collective is exposed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

__all__ = ["Segment", "Link", "OverlapResult", "simulate_overlap", "layer_segments", "moe_comm"]


@dataclasses.dataclass(frozen=True)
class Segment:
    """Compute between two collectives (for a whole micro-batch) and the collective after it."""

    label: str
    compute_s: float
    kernels: int
    comm_bytes: int = 0
    comm: str = "all_reduce"  # or "all_gather" / "all_to_all"


@dataclasses.dataclass(frozen=True)
class Link:
    """Collective cost over ``ranks`` devices: ``latency_s`` plus bytes over the bus bandwidth
    (NCCL's ``busbw`` convention, so an all-reduce moves ``2(n-1)/n`` of the payload)."""

    ranks: int
    bus_bytes_per_s: float
    latency_s: float

    def time(self, kind: str, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        # all-gather and all-to-all: each rank receives (n-1)/n of the payload
        factor = (self.ranks - 1) / self.ranks * (2.0 if kind == "all_reduce" else 1.0)
        return self.latency_s + nbytes * factor / self.bus_bytes_per_s


@dataclasses.dataclass(frozen=True)
class OverlapResult:
    """One simulated pass: ``seconds`` end to end, busy compute and communication seconds, and
    the communication time not hidden under compute."""

    k: int
    seconds: float
    compute_s: float
    comm_s: float

    @property
    def exposed_comm_s(self) -> float:
        return max(self.seconds - self.compute_s, 0.0)


def _stretched_end(start: float, duration: float, busy: Sequence[tuple[float, float]], interference: float) -> float:
    """End of a compute op of ``duration`` that runs ``1 + interference`` times slower while a
    collective is in flight (fixed point of end = start + duration + f * overlap(start, end))."""
    end = start + duration
    for _ in range(50):
        overlap = sum(max(0.0, min(end, e) - max(start, s)) for s, e in busy if e > start)
        new = start + duration + interference * overlap
        if abs(new - end) < 1e-12:
            break
        end = new
    return end


def simulate_overlap(segments: Sequence[Segment], k: int, link: Link, launch_overhead_s: float = 4e-6,
                     interference: float = 0.1) -> OverlapResult:
    """Simulate the runner's order for ``k`` sub-micro-batches over ``segments`` (see module doc)."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    compute_free = comm_free = 0.0
    busy: list[tuple[float, float]] = []
    done_prev: list[float] = [0.0] * k
    compute_total = comm_total = 0.0
    for seg in segments:
        done = [0.0] * k
        for j in range(k):
            start = max(compute_free, done_prev[j])
            end = _stretched_end(start, seg.compute_s / k + seg.kernels * launch_overhead_s, busy, interference)
            compute_total += end - start
            compute_free = end
            if seg.comm_bytes:
                t = link.time(seg.comm, seg.comm_bytes / k)
                comm_start = max(comm_free, end)
                comm_free = comm_start + t
                busy.append((comm_start, comm_free))
                comm_total += t
                done[j] = comm_free
            else:
                done[j] = end
        done_prev = done
    return OverlapResult(k, max(compute_free, comm_free), compute_total, comm_total)


def moe_comm(bank: Any, output_bytes: int, tp: int) -> tuple[int, str]:
    """(bytes, kind) a mixture-of-experts bank communicates per pass, forward or backward alike.

    ``tensor`` mode: one all-reduce of the output (forward) or of the input gradient (backward),
    as a dense MLP. ``expert`` mode: two all-to-alls of the dispatched rows (each rank sends
    ``top_k/tp`` of the tokens' hidden states and gets as many back) and one all-gather of the
    token slices (output forward, input gradient backward), priced together as one collective
    whose ranks each receive ``(n-1)/n`` of the payload (latency counted once).
    """
    if bank.mode == "expert":
        return int(output_bytes * (2 * bank.top_k / tp + 1)), "all_to_all"
    return output_bytes, "all_reduce"


def layer_segments(graph: Any, plan: Any, cost_model: Any, layer: str, backward: bool = False) -> list[Segment]:
    """The TP segments of one repeated block ``layer`` (e.g. ``transformer.h.0``) of a traced
    model, forward or backward, for one TP rank (see the module docstring for the cuts)."""
    from merak.partitioner.proxy_graph import COMPUTE, REPLICATED

    nodes = [n for n in graph.nodes if n.layer == layer and n.role in (COMPUTE, REPLICATED)]
    if not nodes:
        raise ValueError(f"no compute nodes in layer {layer!r}")
    tp = plan.tp
    fwd_cuts = {n.name for n in nodes if n.op == "call_module" and plan.style(n.target) in ("row", "vocab")}
    bwd_cuts = {i.value: ("all_reduce" if i.kind == "copy" else "all_gather") for i in plan.inserts}
    segments: list[Segment] = []
    compute, kernels, first, last = 0.0, 0, None, None

    def where(node: Any) -> str:
        return node.module.removeprefix(layer + ".") if node.module and node.module != layer else node.name

    def close(comm_bytes: int, comm: str = "all_reduce") -> None:
        nonlocal compute, kernels, first, last
        segments.append(Segment(f"{where(first)} … {where(last)}", compute, kernels, comm_bytes, comm))
        compute, kernels, first, last = 0.0, 0, None, None

    banks = {e.node: e for e in getattr(plan, "experts", {}).values()}
    for node in (reversed(nodes) if backward else nodes):
        if backward and node.name in bwd_cuts and (compute or kernels):
            close(node.output_bytes, bwd_cuts[node.name])
        cost = cost_model.node_cost(node)
        t = cost.backward if backward else cost.forward
        sharded = node.name in plan.layouts or plan.style(node.target) != "replicate"
        compute += t / tp if sharded else t
        kernels += 1 if (node.flops or node.memory_bytes) and (not backward or node.requires_grad) else 0
        first, last = first or node, node
        if node.name in banks:
            close(*moe_comm(banks[node.name], node.output_bytes, tp))
        elif not backward and node.name in fwd_cuts:
            close(node.output_bytes)
    if compute or kernels:
        close(0)
    return segments
