"""Forward-only pipeline pass, for evaluation: every stage forwards micro-batches in order.

Built from the same passes as the training schedules (communication and loads are derived,
not written by hand). There is no backward, so nothing is kept for later: the executor runs
it under ``torch.no_grad``. With virtual stages a rank runs its chunks in model order, each
over every micro-batch: the chain of chunks has no cycle, so this cannot wait on itself.
"""

from __future__ import annotations

from merak.runtime.pipeline.comm_pass import add_communication
from merak.runtime.pipeline.instructions import Instruction
from merak.runtime.pipeline.placement import Placement
from merak.runtime.pipeline.schedules.common import forward, insert_loads


def build(num_stages: int, num_microbatches: int, stage_id: int,
          placement: Placement | None = None) -> list[Instruction]:
    if num_microbatches < 1 or not 0 <= stage_id < num_stages:
        raise ValueError(f"forward_only needs num_microbatches >= 1 and 0 <= stage_id < {num_stages}")
    placement = placement or Placement.flat(num_stages)
    compute = []
    for s in range(num_stages):
        chunks = sorted(range(placement.num_chunks), key=lambda c: placement.virtual_stage(s, c))
        compute.append([forward(s, m, c) for c in chunks for m in range(num_microbatches)])
    return insert_loads(add_communication(compute, placement)[stage_id], stage_id)
