"""ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", 2023, section 6).

Two chunks per rank in the V placement (rank ``r`` holds virtual stages ``r`` and
``2P-1-r``), backward split into input gradient (``BI``) and weight gradient (``W``) as in
ZB-H1. The V makes the first and the last virtual stage share rank 0, so the loss of a
micro-batch is computed where its input came from: the first gradient starts back after
``2P`` half-stage forwards on the deepest rank instead of ``P`` whole ones, and ``W`` passes
fill what is left. With F = B = W each rank is busy 24 units at P=4, M=8 and the makespan is
25.5 (its lower bound: rank ``P-1`` cannot start before the first micro-batch crossed ``P-1``
half-stage chunks); activations peak at ``P`` micro-batches of a whole stage, 1F1B's.

Order on rank ``r`` (``f0, f1``: forwards of chunk 0 / 1, ``b``: ``BI``, ``w``: ``W``):

1. warm-up: ``2(P-r)-1`` times ``f0``; then ``r`` times ``f1 f0``; then ``P-r`` times
   ``f1 b1 w1`` (chunk 1 already back-propagates: its gradient comes from the rank before);
2. steady: ``f0 b0 w0 f1 b1 w1`` until every forward is issued;
3. cool-down: ``r`` times ``b0 b1``, then ``P-r`` times ``b0 w0``, then the ``W`` passes left
   (chunk 1's, then chunk 0's) fill the tail.

With fewer than ``2P-1`` micro-batches the pattern is built for ``2P-1`` and the missing
micro-batches' instructions are left out.

**Recompute-aware form** (Merak's idea carried over, :func:`.recompute.plan_recomputation`):
a micro-batch that drops activations is recomputed right before the gradient receive that
precedes its ``BI`` (the recomputation runs while the gradient is on its way); ``W`` passes
that would keep recomputed activations alive past the memory 1F1B with the same plan needs
are pulled in; and every micro-batch whose kept activations still fit keeps them (the last
virtual stage, rank 0's chunk 1, whose ``BI`` follows its forward, so never recomputes).
P=4, M=8, full recomputation, F=B=W=R=1: makespan 33 at 1F1B+recomputation's activation
peak (1F1B + recomputation: 44; shifted critical path: 38).
"""

from __future__ import annotations

from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.pipeline.placement import Placement
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.schedules.common import ChunkCounter, check_sizes, lower
from merak.runtime.pipeline.schedules.recompute import plan_recomputation


def placement(num_stages: int) -> Placement:
    return Placement(num_stages, 2, "v")


def build_all(
    num_stages: int, num_microbatches: int, recompute_plan: RecomputePlan | None = None
) -> list[list[Instruction]]:
    plan = check_sizes(num_stages, num_microbatches, recompute_plan)
    where = placement(num_stages)
    compute = [_rank_order(r, num_stages, num_microbatches) for r in range(num_stages)]
    recomputed = plan_recomputation(compute, plan, where, num_microbatches)
    return lower(compute, recomputed, early_recompute=True, placement=where)


def _rank_order(rank: int, num_stages: int, num_microbatches: int) -> list[Instruction]:
    F, BI, W = Op.FORWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT
    p, m = num_stages, max(num_microbatches, 2 * num_stages - 1)
    c = ChunkCounter(rank)
    for _ in range(2 * (p - rank) - 1):
        c.emit(F, 0)
    for _ in range(rank):
        c.emit(F, 1)
        c.emit(F, 0)
    for _ in range(p - rank):
        for op in (F, BI, W):
            c.emit(op, 1)
    while c.count(F, 0) < m or c.count(F, 1) < c.count(F, 0):
        if c.count(F, 0) < m:
            c.emit(F, 0)
        for op, chunk in ((BI, 0), (W, 0), (F, 1), (BI, 1), (W, 1)):
            c.emit(op, chunk)
    for _ in range(rank):
        c.emit(BI, 0)
        c.emit(BI, 1)
    for _ in range(p - rank):
        c.emit(BI, 0)
        c.emit(W, 0)
    for chunk in (1, 0):
        while c.count(W, chunk) < c.count(BI, chunk):
            c.emit(W, chunk)
    return [ins for ins in c.out if ins.microbatch < num_microbatches]
