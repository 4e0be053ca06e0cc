"""1F1B (DeepSpeed / PipeDream-flush): stage ``s`` runs ``P-1-s`` warm-up forwards, then
alternates one forward and one backward, then drains the remaining backwards.

Bounds in-flight micro-batches on stage ``s`` to ``P-s`` (GPipe: ``M``) with the same bubble,
``(P-1)/(M+P-1)`` of the step under uniform costs. With recomputation the gradient receive comes
first and the recomputation after it, as in DeepSpeed's activation checkpointing: the
recomputation then sits on the critical path, which is what the shifted schedule fixes.
"""

from __future__ import annotations

from merak.runtime.pipeline.instructions import Instruction
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.schedules.common import all_recomputed, check_sizes, lower, one_f_one_b_order


def warmup_forwards(stage: int, num_stages: int) -> int:
    return num_stages - 1 - stage


def compute_order(num_stages: int, num_microbatches: int) -> list[list[Instruction]]:
    """Every stage's forwards and backwards in 1F1B order (no communication yet)."""
    return [
        one_f_one_b_order(s, num_microbatches, warmup_forwards(s, num_stages))
        for s in range(num_stages)
    ]


def build_all(
    num_stages: int, num_microbatches: int, recompute_plan: RecomputePlan | None = None
) -> list[list[Instruction]]:
    plan = check_sizes(num_stages, num_microbatches, recompute_plan)
    return lower(compute_order(num_stages, num_microbatches), all_recomputed(plan, num_microbatches))
