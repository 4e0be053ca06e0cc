"""Merak's shifted critical path schedule: 1F1B with recomputation taken off the critical path.

In 1F1B with activation recomputation every backward waits for its gradient and *then*
recomputes, so the recomputation of each micro-batch lies on the path that decides the step
time. Three changes shift it off that path (P=4, M=8, F:(B+W):R = 1:2:1, no latency: 44 → 38):

(a) **Early recomputation.** ``RECOMPUTE`` is issued before the ``RECV_GRAD`` of its backward,
    so it runs while the stage would otherwise wait for the gradient.

(b) **Redundant recomputation dropped, within 1F1B's memory.** A micro-batch keeps its
    activations (no ``RECOMPUTE``) whenever doing so leaves the stage's activation peak
    (``schedules.memory.peak_activations``) at or below what 1F1B with the *same plan* peaks
    at on that stage. Candidates are tried from the last micro-batch down, each accepted or not
    by that test, so the result is exactly the set the memory allows:

    * the **last stage never recomputes**: it back-propagates each micro-batch right after
      forwarding it, so the kept activations are the same single micro-batch that 1F1B's
      recomputation would materialize anyway;
    * **micro-batch 0 keeps its activations on every stage**: its backward is the stage's
      first, so while it is alive no other micro-batch is materialized; the stage's memory has
      not peaked yet;
    * **cool-down micro-batches keep theirs only where the plan leaves room.** The first
      backward after the last forward still has all ``P-s`` micro-batches in flight, 1F1B's
      peak moment, and every cool-down micro-batch is alive then; with full recomputation its
      kept activations would add a whole micro-batch to the peak. (Merak keeps the last
      ``P-1-s`` forwards of stage ``s`` regardless; that reaches 37 instead of 38 at P=4, M=8,
      but peaks at 1F1B-without-recomputation's memory on every stage.)

(c) **Earlier start of the critical path.** On stage ``P-2`` the third forward runs before
    the first backward (1F1B's order ``F0 F1 B0 F2 B1`` becomes ``F0 F1 F2 B0 B1``), so the
    last stage has micro-batch 2 at hand when it finishes micro-batch 1 instead of idling while
    stage ``P-2`` back-propagates. This holds one more micro-batch in flight on stage ``P-2``
    for a moment; it is done only when the memory test of (b) admits it (with full
    recomputation the extra micro-batch holds only its checkpoint). Merak sends that
    activation late because DeepSpeed's sends block until the peer receives; the executor's
    sends are buffered, so here it leaves as soon as it exists (a late send can only delay the
    last stage, by up to twice the link latency).

With no recomputation at all the schedule is 1F1B.
"""

from __future__ import annotations

from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.schedules import one_f_one_b
from merak.runtime.pipeline.schedules.common import all_recomputed, check_sizes, lower
from merak.runtime.pipeline.schedules.recompute import drop_redundant, stage_peak as _stage_peak


def build_all(
    num_stages: int, num_microbatches: int, recompute_plan: RecomputePlan | None = None
) -> list[list[Instruction]]:
    plan = check_sizes(num_stages, num_microbatches, recompute_plan)
    compute = one_f_one_b.compute_order(num_stages, num_microbatches)
    recomputed = all_recomputed(plan, num_microbatches)
    budgets = [_stage_peak(compute[s], s, plan, recomputed) for s in range(num_stages)]
    if num_stages >= 2:
        _forward_before_first_backward(compute, num_stages - 2, plan, recomputed, budgets)
    for stage in range(num_stages):
        drop_redundant(compute[stage], stage, plan, recomputed, budgets[stage])
    return lower(compute, recomputed, early_recompute=True)


def _forward_before_first_backward(
    compute: list[list[Instruction]],
    stage: int,
    plan: RecomputePlan,
    recomputed: set[tuple[int, int]],
    budgets: list[float],
) -> None:
    """(c): swap the stage's first backward with the forward that follows it, if memory allows."""
    order = compute[stage]
    first_bwd = next(i for i, ins in enumerate(order) if ins.op is Op.BACKWARD)
    if first_bwd + 1 >= len(order) or order[first_bwd + 1].op is not Op.FORWARD:
        return  # too few micro-batches: no forward follows the first backward
    trial = list(order)
    trial[first_bwd], trial[first_bwd + 1] = trial[first_bwd + 1], trial[first_bwd]
    if _stage_peak(trial, stage, plan, recomputed) <= budgets[stage] + 1e-9:
        compute[stage] = trial
