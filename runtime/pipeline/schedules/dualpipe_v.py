"""DualPipeV (DeepSeek-V3 report, 2024; the "cut-in-half" DualPipe): the V placement of ZB-V
with a steady phase in which every step pairs the forward of one micro-batch with the full
backward of another, on the two chunks of the rank.

On GPUs the pair is issued together so the communication of one hides under the computation
of the other (DeepSeek overlaps expert all-to-all this way); here the pair is two adjacent
instructions, ``F`` then ``B`` (the executor runs them in turn; the simulator charges them in
turn), so the benefit shown in simulation is the schedule's shape, not the overlap. Input and
weight gradients are split (``BI`` + ``W``, as in zero-bubble schedules) only where a deferred
``W`` fills a gap: in the warm-up on chunk 1 and in the cool-down.

Order on rank ``r`` of ``P`` (``f0``/``f1``: forwards of chunk 0/1; ``b``: full backward;
``bi``, ``w``: split backward; ``w`` runs the oldest deferred weight pass):

1. ``2(P-1-r)`` times ``f0``;
2. ``r+1`` times ``f0 f1``;
3. ``P-1-r`` times ``bi1 w f1``;
4. ``M-2P+r+1`` times ``f0 b1`` then ``f1 b0`` (the overlapped pairs);
5. ``P-1-r`` times ``b1``, then ``f1 b0``;
6. ``r+1`` times ``b1 b0``, switching to split backwards half-way (odd ranks before ``b1``,
   even ranks before ``b0``) so the cool-down has weight passes to fill it with;
7. ``P-1-r`` times ``w bi0``;
8. the remaining ``r+1`` times ``w``.

Needs ``M >= 2P`` micro-batches (every rank must reach the paired phase).

**Recompute-aware form**: as ZB-V's (:func:`.recompute.plan_recomputation`): recomputation
before the gradient it serves arrives, deferred ``W`` pulled in when they would keep
recomputed activations alive past 1F1B-with-the-same-plan's memory, and the micro-batches that
fit keep their activations.
"""

from __future__ import annotations

from collections import deque

from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.pipeline.placement import Placement
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.schedules.common import ChunkCounter, check_sizes, lower
from merak.runtime.pipeline.schedules.recompute import plan_recomputation


def build_all(
    num_stages: int, num_microbatches: int, recompute_plan: RecomputePlan | None = None
) -> list[list[Instruction]]:
    plan = check_sizes(num_stages, num_microbatches, recompute_plan)
    check_microbatches(num_stages, num_microbatches)
    where = Placement(num_stages, 2, "v")
    compute = [_RankOrder(r).build(num_stages, num_microbatches) for r in range(num_stages)]
    recomputed = plan_recomputation(compute, plan, where, num_microbatches)
    return lower(compute, recomputed, early_recompute=True, placement=where)


def check_microbatches(num_stages: int, num_microbatches: int) -> None:
    """Every rank must reach the paired phase: ``M >= 2P``."""
    if num_microbatches < 2 * num_stages:
        raise ValueError(
            f"dualpipe_v needs at least 2P = {2 * num_stages} micro-batches for P={num_stages} "
            f"pipeline stages, got M={num_microbatches}; raise gradient_accumulation_steps to "
            f">= {2 * num_stages} or use zb_v (any M)"
        )


class _RankOrder(ChunkCounter):
    """One rank's phases; split backwards queue their weight pass until ``weight()``."""

    def __init__(self, rank: int) -> None:
        super().__init__(rank)
        self.deferred: deque[Instruction] = deque()

    def backward(self, chunk: int, split: bool = False) -> None:
        ins = self.emit(Op.BACKWARD_INPUT if split else Op.BACKWARD, chunk)
        if split:
            self.deferred.append(Instruction(Op.BACKWARD_WEIGHT, self.rank, ins.microbatch, chunk))

    def weight(self) -> None:
        self.out.append(self.deferred.popleft())

    def build(self, p: int, m: int) -> list[Instruction]:
        r, F = self.rank, Op.FORWARD
        for _ in range(2 * (p - 1 - r)):
            self.emit(F, 0)
        for _ in range(r + 1):
            self.emit(F, 0)
            self.emit(F, 1)
        for _ in range(p - 1 - r):
            self.backward(1, split=True)
            self.weight()
            self.emit(F, 1)
        for _ in range(m - 2 * p + r + 1):
            self.emit(F, 0)
            self.backward(1)
            self.emit(F, 1)
            self.backward(0)
        for _ in range(p - 1 - r):
            self.backward(1)
            self.emit(F, 1)
            self.backward(0)
        split = False
        for i in range(r + 1):
            if i == (r + 1) // 2 and r % 2 == 1:
                split = True
            self.backward(1, split)
            if i == (r + 1) // 2 and r % 2 == 0:
                split = True
            self.backward(0, split)
        for _ in range(p - 1 - r):
            self.weight()
            self.backward(0, split=True)
        while self.deferred:
            self.weight()
        return self.out
