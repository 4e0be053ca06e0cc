"""ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023): 1F1B with each backward split
into the input gradient (``BACKWARD_INPUT``, needed by the previous stage at once) and the
weight gradient (``BACKWARD_WEIGHT``, needed only by the optimizer step).

Only the input gradients travel the pipeline, so the first gradient reaches stage 0 after
``P`` forwards and ``P-1`` input-gradient passes instead of ``P-1`` full backwards; the weight
passes fill the idle slots that are left. Stage ``s`` keeps the 1F1B order but defers its
weight passes by ``s`` micro-batches (the last stage by ``P-1``), which is what fills the
bubbles. Activations live until the weight pass, so stage ``s`` holds up to
``(P-s) + s = P`` micro-batches: 1F1B's peak (stage 0's), reached now on every stage.

With uniform costs the bubble is ``(P-1)·F`` per stage against 1F1B's ``(P-1)·(F+B+W)``:
a third. Recomputation, if planned, goes right before the input-gradient pass.
"""

from __future__ import annotations

from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.schedules.common import all_recomputed, check_sizes, lower, one_f_one_b_order
from merak.runtime.pipeline.schedules.one_f_one_b import warmup_forwards


def build_all(
    num_stages: int, num_microbatches: int, recompute_plan: RecomputePlan | None = None
) -> list[list[Instruction]]:
    plan = check_sizes(num_stages, num_microbatches, recompute_plan)
    compute = [_stage_order(s, num_stages, num_microbatches) for s in range(num_stages)]
    return lower(compute, all_recomputed(plan, num_microbatches))


def _stage_order(stage: int, num_stages: int, num_microbatches: int) -> list[Instruction]:
    """1F1B order of forwards and input-gradient passes, then weight passes inserted so that at
    most ``stage`` are outstanding after each input-gradient pass, except in the cool-down
    (no forwards left to make room for), where each input-gradient pass is followed by one."""
    order = one_f_one_b_order(stage, num_microbatches, warmup_forwards(stage, num_stages), (Op.BACKWARD_INPUT,))
    forwards_left = num_microbatches
    pending: list[int] = []
    out: list[Instruction] = []
    for ins in order:
        out.append(ins)
        if ins.op is Op.FORWARD:
            forwards_left -= 1
            continue
        pending.append(ins.microbatch)
        if len(pending) > stage or forwards_left == 0:
            out.append(Instruction(Op.BACKWARD_WEIGHT, stage, pending.pop(0)))
    out.extend(Instruction(Op.BACKWARD_WEIGHT, stage, mb) for mb in pending)
    return out
