"""Merak's rule for dropping redundant recomputation, shared by every recompute-aware schedule.

A micro-batch keeps its activations (gets no ``RECOMPUTE``) whenever doing so leaves the
stage's activation peak (:func:`merak.runtime.pipeline.schedules.memory.peak_activations`) at
or below a budget; the schedules use what 1F1B with the *same* recompute plan peaks at on that
stage, so a recompute-aware schedule never needs more activation memory than the plan was
chosen for. Candidates are tried from the last micro-batch down, each accepted or refused by
that test, so the result is exactly the set the memory allows (see
:mod:`merak.runtime.pipeline.schedules.shifted_critical_path` for which ones that is in 1F1B).

Works on compute orders (forwards and backwards, before communication is inserted), with or
without virtual stages: keys are ``(chunk, micro-batch)``, a chunk weighs ``1/v`` and drops its
own fraction of the plan (:meth:`RecomputePlan.chunk_fraction`).
"""

from __future__ import annotations

from collections.abc import Sequence

from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.pipeline.placement import Placement
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.schedules.memory import activation_profile, peak_activations

_BACKWARDS = (Op.BACKWARD, Op.BACKWARD_INPUT)


def stage_keys(recomputed: set[tuple[int, ...]], stage: int) -> set[tuple[int, int]]:
    """The ``(chunk, micro-batch)`` keys of ``stage`` in a set of (stage, [chunk,] micro-batch)."""
    return {(0, item[1]) if len(item) == 2 else (item[1], item[2]) for item in recomputed if item[0] == stage}


def _discard(recomputed: set[tuple[int, ...]], stage: int, key: tuple[int, int]) -> None:
    recomputed.discard((stage, *key))
    if key[0] == 0:
        recomputed.discard((stage, key[1]))


def stage_peak(
    order: Sequence[Instruction], stage: int, plan: RecomputePlan, recomputed: set[tuple[int, ...]],
    num_chunks: int = 1,
) -> float:
    """Peak activations of one stage's compute order when ``recomputed`` drop theirs."""
    return peak_activations(order, plan.stage_chunk_fractions(stage, num_chunks), stage_keys(recomputed, stage),
                            1.0 / num_chunks)


def one_f_one_b_budgets(num_stages: int, num_microbatches: int, plan: RecomputePlan) -> list[float]:
    """Per stage, the activation peak of 1F1B with ``plan`` (every micro-batch recomputed on
    the stages that recompute): the memory the plan was sized for. A per-chunk plan counts
    with each rank's mean fraction (1F1B has one chunk per rank)."""
    from merak.runtime.pipeline.schedules import one_f_one_b  # one_f_one_b does not import us

    plan = RecomputePlan(plan.fractions)
    compute = one_f_one_b.compute_order(num_stages, num_microbatches)
    recomputed = {(s, mb) for s in range(num_stages) if plan.recomputes(s) for mb in range(num_microbatches)}
    return [stage_peak(compute[s], s, plan, recomputed) for s in range(num_stages)]


def keep_within_budget(
    compute: Sequence[Sequence[Instruction]],
    recomputed: set[tuple[int, ...]],
    plan: RecomputePlan,
    placement: Placement,
    budgets: Sequence[float],
) -> None:
    """Remove from ``recomputed`` (in place) every micro-batch whose kept activations fit
    under ``budgets[stage]``, trying the latest micro-batches first."""
    for stage, order in enumerate(compute):
        drop_redundant(order, stage, plan, recomputed, budgets[stage], placement.num_chunks)


def drop_redundant(
    order: Sequence[Instruction],
    stage: int,
    plan: RecomputePlan,
    recomputed: set[tuple[int, ...]],
    budget: float,
    num_chunks: int = 1,
) -> None:
    """One stage of :func:`keep_within_budget`.

    Keeping a micro-batch adds ``fraction`` (times the chunk's weight) to the stage's
    activations from its forward up to its backward (at the backward it is fully materialized
    either way), so the test is one window of the current activation profile, updated as keeps
    are accepted.
    """
    fractions = plan.stage_chunk_fractions(stage, num_chunks)
    keys = stage_keys(recomputed, stage)
    if not keys:
        return
    weight = 1.0 / num_chunks
    profile = activation_profile(order, fractions, keys, weight)
    position: dict[tuple[Op, tuple[int, int]], int] = {}
    for i, ins in enumerate(order):
        op = Op.BACKWARD if ins.op in _BACKWARDS else ins.op
        position.setdefault((op, ins.key), i)
    for key in sorted(keys, key=lambda k: (k[1], k[0]), reverse=True):
        start, end = position[(Op.FORWARD, key)], position[(Op.BACKWARD, key)]
        added = fractions[key[0]] * weight
        if max(profile[start:end]) + added <= budget + 1e-9:
            _discard(recomputed, stage, key)
            profile[start:end] = [m + added for m in profile[start:end]]


def weights_within_budget(
    order: list[Instruction],
    stage: int,
    plan: RecomputePlan,
    recomputed: set[tuple[int, ...]],
    budget: float,
    num_chunks: int = 1,
) -> None:
    """Move weight-gradient passes (``W``) earlier, in place, so the stage's activations stay
    under ``budget`` wherever that is possible.

    Zero-bubble schedules defer ``W`` to fill idle time, but a micro-batch's activations live
    until its ``W``: a recomputed micro-batch is materialized again from its recomputation, so
    deferring its ``W`` over several others gives back the memory the recomputation saved.
    Walking the order with the running activation total (as ``activation_profile`` counts
    it), before an instruction that would exceed the budget the oldest pending ``W`` (input
    gradient done) runs, as many as it takes; where none is pending the overshoot is the
    schedule's own and stays.
    """
    fractions, weight = plan.stage_chunk_fractions(stage, num_chunks), 1.0 / num_chunks
    keys = stage_keys(recomputed, stage)
    if not keys:
        return  # nothing recomputed here: the peak is the schedule's in-flight count
    weights = {ins.key: ins for ins in order if ins.op is Op.BACKWARD_WEIGHT}
    held: dict[tuple[int, int], float] = {}
    pending: list[tuple[int, int]] = []  # input gradient done, W not run yet, oldest first
    out: list[Instruction] = []

    def run_weight(key: tuple[int, int]) -> None:
        pending.remove(key)
        out.append(weights.pop(key))
        held.pop(key, None)

    for ins in order:
        if ins.microbatch is None:
            out.append(ins)
            continue
        key = ins.key
        if ins.op is Op.BACKWARD_WEIGHT:
            if key in weights:  # not already run early
                run_weight(key)
            continue
        if ins.op is Op.FORWARD:
            new = weight * (1.0 - fractions[key[0]] if key in keys else 1.0)
        elif ins.op in _BACKWARDS or ins.op is Op.RECOMPUTE:
            new = weight
        else:
            new = held.get(key, 0.0)
        while pending and sum(held.values()) - held.get(key, 0.0) + new > budget + 1e-9:
            run_weight(pending[0])
        held[key] = new
        out.append(ins)
        if ins.op is Op.BACKWARD:
            held.pop(key)
        elif ins.op is Op.BACKWARD_INPUT:
            pending.append(key)
    order[:] = out


def plan_recomputation(
    compute: Sequence[list[Instruction]],
    plan: RecomputePlan,
    placement: Placement,
    num_microbatches: int,
) -> set[tuple[int, ...]]:
    """The recompute-aware form of a virtual-stage schedule: which (stage, chunk, micro-batch)
    recompute, after ``W`` passes were pulled in (:func:`weights_within_budget`) and redundant
    recomputation dropped (:func:`keep_within_budget`), both under one budget: the plan's own
    ``activation_budget`` when it names one (a per-chunk stage-aware plan), else the most
    activation memory 1F1B with the same plan needs on any stage (the device the plan was
    sized for). ``compute`` may be reordered in place; pass the result to ``lower`` with
    ``early_recompute=True`` so each recomputation is issued before its gradient arrives."""
    from merak.runtime.pipeline.schedules.common import all_recomputed  # common imports memory only

    recomputed = all_recomputed(plan, num_microbatches, placement.num_chunks)
    if not recomputed:
        return recomputed
    budget = plan.activation_budget
    if budget is None:
        budget = max(one_f_one_b_budgets(placement.num_ranks, num_microbatches, plan))
    for stage, order in enumerate(compute):
        weights_within_budget(order, stage, plan, recomputed, budget, placement.num_chunks)
    keep_within_budget(compute, recomputed, plan, placement, [budget] * placement.num_ranks)
    return recomputed
