"""Interleaved 1F1B (Megatron-LM's virtual pipeline, Narayanan et al. 2021).

Each of the ``P`` ranks holds ``v >= 2`` model chunks in the loop placement (rank ``r`` holds
virtual stages ``r, r+P, ...``), so a micro-batch travels the ranks ``v`` times and each hop
costs ``1/v`` of a stage. The pipeline fills ``v`` times faster: with uniform costs the bubble
is ``(P-1)/v`` stage-steps instead of ``P-1`` (P=4, M=8, F=B=W=1: makespan 28.5 against
1F1B's 33), at the price of ``v`` times as many messages and a deeper warm-up.

Order on a rank: micro-batches go in groups of ``P``; a group is forwarded through chunk 0,
then chunk 1, ..., before the next group starts (backwards the same, chunks in reverse). Rank
``r`` warms up with ``2(P-1-r) + (v-1)·P`` forwards — enough that the first gradient has come
back before its forwards run out — then alternates one forward and one backward. ``M`` must
be a multiple of ``P`` (as in Megatron-LM): with a smaller last group the warm-up no longer
matches the loop (P=4, M=5 stalls to makespan 24 against 19.5 for whole groups, and v=3
deadlocks), so other ``M`` are refused with the nearest valid ones named.

The recompute-aware form issues each recomputation before the gradient receive it serves
(so it fills the wait) and keeps the activations of every micro-batch that fits under the
most activation memory 1F1B with the same recompute plan needs
(:func:`.recompute.plan_recomputation`), like the shifted critical path schedule.
"""

from __future__ import annotations

from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.pipeline.placement import Placement
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.schedules.common import check_sizes, lower
from merak.runtime.pipeline.schedules.recompute import plan_recomputation

#: Chunks per rank when the caller does not say.
DEFAULT_CHUNKS = 2


def check_microbatches(num_stages: int, num_microbatches: int) -> None:
    """Interleaving runs micro-batches in whole groups of ``P``: ``M`` must be a multiple of ``P``."""
    if num_microbatches % num_stages:
        below = num_microbatches // num_stages * num_stages
        valid = [m for m in (below, below + num_stages) if m > 0]
        raise ValueError(
            f"interleaved_1f1b needs the number of micro-batches M to be a multiple of the "
            f"pipeline stages P={num_stages}, got M={num_microbatches}; valid M: "
            f"{', '.join(map(str, valid))} (any multiple of {num_stages}); set "
            f"gradient_accumulation_steps accordingly"
        )


def build_all(
    num_stages: int,
    num_microbatches: int,
    recompute_plan: RecomputePlan | None = None,
    num_chunks: int = DEFAULT_CHUNKS,
) -> list[list[Instruction]]:
    plan = check_sizes(num_stages, num_microbatches, recompute_plan)
    if num_chunks < 2:
        raise ValueError(f"interleaved_1f1b needs >= 2 chunks per rank, got {num_chunks}; use 1f1b for one")
    check_microbatches(num_stages, num_microbatches)
    placement = Placement(num_stages, num_chunks, "loop")
    compute = [_rank_order(r, num_stages, num_chunks, num_microbatches) for r in range(num_stages)]
    recomputed = plan_recomputation(compute, plan, placement, num_microbatches)
    return lower(compute, recomputed, early_recompute=True, placement=placement)


def _sequence(num_stages: int, num_chunks: int, num_microbatches: int, backward: bool) -> list[tuple[int, int]]:
    """``(chunk, micro-batch)`` in the order a rank forwards (or back-propagates) them."""
    out: list[tuple[int, int]] = []
    for start in range(0, num_microbatches, num_stages):
        group = range(start, min(start + num_stages, num_microbatches))
        chunks = range(num_chunks - 1, -1, -1) if backward else range(num_chunks)
        out.extend((c, mb) for c in chunks for mb in group)
    return out


def _rank_order(rank: int, num_stages: int, num_chunks: int, num_microbatches: int) -> list[Instruction]:
    forwards = _sequence(num_stages, num_chunks, num_microbatches, backward=False)
    backwards = _sequence(num_stages, num_chunks, num_microbatches, backward=True)
    total = len(forwards)
    warmup = min(total, 2 * (num_stages - 1 - rank) + (num_chunks - 1) * num_stages)
    order = [Instruction(Op.FORWARD, rank, mb, c) for c, mb in forwards[:warmup]]
    for i, (c, mb) in enumerate(backwards):
        if warmup + i < total:
            fc, fmb = forwards[warmup + i]
            order.append(Instruction(Op.FORWARD, rank, fmb, fc))
        order.append(Instruction(Op.BACKWARD, rank, mb, c))
    return order
