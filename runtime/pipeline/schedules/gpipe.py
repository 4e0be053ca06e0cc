"""GPipe: every micro-batch forward, then every micro-batch backward (in the same order).

The simplest correct schedule and the memory worst case: stage ``s`` holds all ``M``
micro-batches in flight. Kept as the baseline the others are measured against.
"""

from __future__ import annotations

from merak.runtime.pipeline.instructions import Instruction
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.schedules.common import all_recomputed, check_sizes, lower, one_f_one_b_order


def build_all(
    num_stages: int, num_microbatches: int, recompute_plan: RecomputePlan | None = None
) -> list[list[Instruction]]:
    plan = check_sizes(num_stages, num_microbatches, recompute_plan)
    compute = [
        one_f_one_b_order(s, num_microbatches, warmup=num_microbatches) for s in range(num_stages)
    ]
    return lower(compute, all_recomputed(plan, num_microbatches))
