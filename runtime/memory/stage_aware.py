"""Merak's stage-aware recomputation for pipelines with virtual stages (several chunks per rank).

Why a rule of its own: the 1F1B rule (:meth:`RecomputePlan.stage_aware`) reads 1F1B's in-flight
counts - stage ``s`` holds ``P-s`` micro-batches - and keeps ``k_s ∝ 1/(P-1-s)`` of stage
``s`` so that every stage's activation peak is stage 0's, ``1 + (P-1)·k_0`` micro-batches. With
virtual stages neither premise holds: the counts differ per (rank, chunk) and come from the
schedule (ZB-V and DualPipeV hold ``2P-k`` micro-batches on virtual stage ``k``; interleaved 1F1B
warms up deeper), and what has to fit is a *rank*, whose chunks share one device.

So the rule is carried over as follows, every count read from the schedule's own instruction list
(:mod:`merak.runtime.pipeline.schedules.memory`, the accounting the schedules use):

1. **Counts.** Each (rank, chunk)'s peak in-flight micro-batches, ``n_{r,c}``
   (:func:`chunk_inflight`).
2. **Target.** The activation peak the 1F1B rule gives every stage of a ``P``-stage pipeline
   with the same ``M``, in micro-batches of a whole stage (``1 + (P-1)·k_0`` once ``M >= P``):
   a rank of a virtual-stage schedule may use what stage-aware 1F1B uses on the same device.
3. **Keeps.** On rank ``r``, chunk ``c`` keeps ``k_c = min(1, λ/(n_{r,c}-1))`` of its
   activations (a chunk with one micro-batch in flight keeps all), as 1F1B's stages do, which
   gives each chunk's own peak the same height ``1 + λ`` (in its micro-batches); ``λ`` is the
   largest for which the rank's peak - walked over the rank's instructions with every
   micro-batch of each chunk dropping its ``1 - k_c`` until its backward, after the schedule's
   own pass that pulls deferred weight-gradient passes in under the target (zero-bubble
   schedules otherwise pile materialized micro-batches up in their cool-down) - stays within
   the target. Keeping more never lowers the peak, so a bisection finds ``λ``.

With one chunk per rank and 1F1B this is exactly the 1F1B rule (stage ``s``: ``λ = k_0(P-1)``);
:func:`stage_aware_plan` returns that rule unchanged there. The plan it returns gives each chunk
its fraction (``RecomputePlan.per_chunk``) and carries the target as its ``activation_budget``,
so the schedule's own dropping of redundant recomputation keeps to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from merak.runtime.memory.policy import ActivationPlan
from merak.runtime.memory.recompute_plan import DEFAULT_FIRST_STAGE_KEEP, RecomputePlan
from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.pipeline.placement import Placement
from merak.runtime.pipeline.schedule import build_all, placement_for
from merak.runtime.pipeline.schedules.memory import chunk_peak_inflight, peak_activations
from merak.runtime.pipeline.schedules.recompute import one_f_one_b_budgets, weights_within_budget

__all__ = ["chunk_inflight", "stage_aware_target", "chunk_keeps", "rank_keeps", "stage_aware_plan",
           "virtual_stage_fractions", "stage_aware_layers"]

#: Bisection steps for ``λ`` (the interval shrinks below 1e-15 of its length) and the digits kept.
_STEPS, _DIGITS = 60, 9
#: The instructions of a compute order (what the schedule families write before lowering).
_COMPUTE = frozenset({Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT})


def chunk_inflight(schedule: Sequence[Sequence[Instruction]], num_chunks: int) -> tuple[tuple[int, ...], ...]:
    """Per rank, per chunk: the most micro-batches forwarded and not yet freed at once."""
    return tuple(chunk_peak_inflight(ops, num_chunks) for ops in schedule)


def stage_aware_target(num_ranks: int, num_microbatches: int,
                       first_stage_keep: float = DEFAULT_FIRST_STAGE_KEEP) -> float:
    """The activation peak (micro-batches of a whole stage) the 1F1B rule gives a
    ``num_ranks``-stage pipeline with ``num_microbatches``: ``1 + (P-1)·k_0`` once ``M >= P``."""
    rule = RecomputePlan.stage_aware(num_ranks, first_stage_keep)
    return max(one_f_one_b_budgets(num_ranks, num_microbatches, rule))


def chunk_keeps(inflight: Sequence[int], level: float) -> tuple[float, ...]:
    """Each chunk's kept share at ``level`` (``λ``): ``min(1, λ/(n-1))``, all for ``n <= 1``."""
    return tuple(1.0 if n <= 1 else min(1.0, level / (n - 1)) for n in inflight)


def rank_keeps(ops: Sequence[Instruction], num_chunks: int, target: float) -> tuple[float, ...]:
    """Each chunk's kept share on one rank (its instruction list ``ops``): ``min(1, λ/(n_c-1))``
    for the largest ``λ`` whose walked activation peak stays within ``target``."""
    order = [ins for ins in ops if ins.op in _COMPUTE]
    inflight = chunk_peak_inflight(order, num_chunks)
    return chunk_keeps(inflight, _fit_level(order, inflight, target))


def _rank_peak(order: Sequence[Instruction], inflight: Sequence[int], level: float, target: float) -> float:
    """The rank's activation peak at ``level``: every micro-batch of a chunk that drops something
    recomputed, after the schedule's own pass that pulls weight-gradient passes in where deferred
    ones would keep recomputed activations alive past ``target`` (``weights_within_budget``, as
    the schedule will run it under the plan's ``activation_budget``)."""
    num_chunks, rank = len(inflight), order[0].stage
    dropped = tuple(1.0 - k for k in chunk_keeps(inflight, level))
    plan = RecomputePlan.per_chunk([(0.0,) * num_chunks] * rank + [dropped])
    recomputed = {(rank, *ins.key) for ins in order if ins.op is Op.FORWARD and dropped[ins.chunk] > 0}
    pulled = list(order)
    weights_within_budget(pulled, rank, plan, recomputed, target, num_chunks)
    return peak_activations(pulled, dropped, {key[1:] for key in recomputed}, 1.0 / num_chunks)


def _fit_level(order: Sequence[Instruction], inflight: Sequence[int], target: float) -> float:
    """The largest ``λ`` whose rank peak stays within ``target`` (0 when even full
    recomputation of every chunk with company does not fit: the least memory the rule has)."""
    def fits(level: float) -> bool:
        return _rank_peak(order, inflight, level, target) <= target + 1e-9

    hi = float(max(max(inflight) - 1, 0))
    if fits(hi):
        return hi
    lo = 0.0
    if not fits(lo):
        return lo
    for _ in range(_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return round(lo, _DIGITS)


def stage_aware_plan(
    schedule: str,
    num_ranks: int,
    num_microbatches: int,
    num_chunks: int | None = None,
    first_stage_keep: float = DEFAULT_FIRST_STAGE_KEEP,
) -> RecomputePlan:
    """The stage-aware :class:`RecomputePlan` of ``schedule`` (see the module docstring): one
    fraction per rank and chunk, and the target as ``activation_budget``. Without virtual
    stages, :meth:`RecomputePlan.stage_aware` (the 1F1B rule)."""
    placement = placement_for(schedule, num_ranks, num_chunks)
    if placement.num_chunks == 1:
        return RecomputePlan.stage_aware(num_ranks, first_stage_keep)
    built = build_all(schedule, num_ranks, num_microbatches, None, placement.num_chunks)
    target = stage_aware_target(num_ranks, num_microbatches, first_stage_keep)
    rows = [tuple(round(1.0 - k, 12) for k in rank_keeps(ops, placement.num_chunks, target)) for ops in built]
    return RecomputePlan.per_chunk(rows, activation_budget=target)


def virtual_stage_fractions(plan: RecomputePlan, placement: Placement) -> tuple[float, ...]:
    """``plan``'s fractions per virtual stage (model order), what a per-layer
    :class:`~merak.runtime.memory.policy.ActivationPlan` over the ``P·v`` chunks is built from."""
    return tuple(plan.chunk_fraction(*placement.locate(k)) for k in range(placement.num_virtual))


def stage_aware_layers(sharding_plan: Any, schedule: str, num_ranks: int, num_microbatches: int,
                       num_chunks: int | None = None) -> ActivationPlan:
    """The per-layer plan of ``stage_aware`` over the ``P·v`` chunks of ``sharding_plan``: each
    chunk recomputes the whole number of its layers nearest to its fraction, earliest first."""
    placement = placement_for(schedule, num_ranks, num_chunks)
    plan = stage_aware_plan(schedule, num_ranks, num_microbatches, placement.num_chunks)
    return ActivationPlan.from_fractions(sharding_plan, virtual_stage_fractions(plan, placement))
