"""Derive point-to-point instructions from a compute order.

Schedules only decide the order of computation on each stage (``F``, ``B``/``BI``, ``W``).
Where the activations and gradients travel follows from that order alone, so it is derived
here once instead of being hand-written in every schedule (the mistake-prone part of
DeepSpeed-style generators). Because the executor's sends are buffered and its receives block
in FIFO order per channel, the placement is simple:

* a receive goes immediately before the computation that consumes it, so a stage never
  blocks earlier than it must;
* a send goes immediately after the computation that produces it, so the peer never waits
  on a message that is already computed.

Each stage then sends micro-batches in the order it computes them, which is exactly the
order its peer receives them in whenever both stages compute in the same micro-batch order
(what the validator checks).
"""

from __future__ import annotations

from collections.abc import Sequence

from merak.runtime.pipeline.instructions import Instruction, Op

#: Backward kinds that consume the gradient from the next stage and produce one for the previous.
INPUT_GRAD_OPS = frozenset({Op.BACKWARD, Op.BACKWARD_INPUT})


def add_communication(compute: Sequence[Sequence[Instruction]]) -> list[list[Instruction]]:
    """Return per-stage lists with RECV/SEND of activations and gradients inserted.

    ``compute[s]`` is stage ``s``'s computation order; instructions other than forwards and
    input-gradient backwards pass through unchanged.
    """
    num_stages = len(compute)
    return [_stage_with_comm(list(ops), stage, num_stages) for stage, ops in enumerate(compute)]


def _stage_with_comm(ops: list[Instruction], stage: int, num_stages: int) -> list[Instruction]:
    first, last = stage == 0, stage == num_stages - 1
    out: list[Instruction] = []
    for ins in ops:
        mb = ins.microbatch
        if ins.op is Op.FORWARD:
            if not first:
                out.append(Instruction(Op.RECV_ACT, stage, mb))
            out.append(ins)
            if not last:
                out.append(Instruction(Op.SEND_ACT, stage, mb))
        elif ins.op in INPUT_GRAD_OPS:
            if not last:
                out.append(Instruction(Op.RECV_GRAD, stage, mb))
            out.append(ins)
            if not first:
                out.append(Instruction(Op.SEND_GRAD, stage, mb))
        else:
            out.append(ins)
    return out
