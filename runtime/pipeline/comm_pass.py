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

With virtual stages (:mod:`merak.runtime.pipeline.placement`) the peer of a chunk is the rank
holding the neighbouring virtual stage; a hop between two chunks of the same rank (the turn
of a V) needs no message at all. Two ranks may then exchange several kinds of message in one
direction (activations of one chunk, gradients of another) over the same untagged FIFO link,
so a last pass puts every rank's receives from one peer in the order that peer sends them:
a receive needed early pulls in front of it the messages sent before it. Those were sent
earlier, so under buffered sends this never waits longer than the original order did.
"""

from __future__ import annotations

from collections.abc import Sequence

from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.pipeline.placement import Placement

#: Backward kinds that consume the gradient from the next stage and produce one for the previous.
INPUT_GRAD_OPS = frozenset({Op.BACKWARD, Op.BACKWARD_INPUT})


def add_communication(
    compute: Sequence[Sequence[Instruction]], placement: Placement | None = None
) -> list[list[Instruction]]:
    """Return per-stage lists with RECV/SEND of activations and gradients inserted.

    ``compute[s]`` is stage ``s``'s computation order; instructions other than forwards and
    input-gradient backwards pass through unchanged. ``placement`` defaults to one chunk per
    stage.
    """
    placement = placement or Placement.flat(len(compute))
    lists = [_stage_with_comm(list(ops), stage, placement) for stage, ops in enumerate(compute)]
    if placement.num_chunks == 1:
        return lists  # one message kind per direction: already in send order
    sent: dict[int, dict[int, list[tuple[str, int, int]]]] = {}  # receiver -> sender -> messages
    for ops in lists:
        for ins in ops:
            if ins.op in (Op.SEND_ACT, Op.SEND_GRAD):
                sent.setdefault(placement.peer(ins), {}).setdefault(ins.stage, []).append(placement.message(ins))
    return [_receive_in_send_order(ops, sent.get(stage, {}), placement) for stage, ops in enumerate(lists)]


def _remote(stage: int, neighbour: tuple[int, int] | None) -> bool:
    return neighbour is not None and neighbour[0] != stage


def _stage_with_comm(ops: list[Instruction], stage: int, placement: Placement) -> list[Instruction]:
    out: list[Instruction] = []
    for ins in ops:
        mb, chunk = ins.microbatch, ins.chunk
        if ins.op is Op.FORWARD or ins.op in INPUT_GRAD_OPS:
            prev, nxt = placement.prev(stage, chunk), placement.next(stage, chunk)
            fwd = ins.op is Op.FORWARD
            before, after = (prev, nxt) if fwd else (nxt, prev)
            if _remote(stage, before):
                out.append(Instruction(Op.RECV_ACT if fwd else Op.RECV_GRAD, stage, mb, chunk))
            out.append(ins)
            if _remote(stage, after):
                out.append(Instruction(Op.SEND_ACT if fwd else Op.SEND_GRAD, stage, mb, chunk))
        else:
            out.append(ins)
    return out


def _receive_in_send_order(
    ops: list[Instruction], sent: dict[int, list[tuple[str, int, int]]], placement: Placement
) -> list[Instruction]:
    """Reorder this rank's receives per sending peer into that peer's send order (``sent``:
    sender -> messages in order; see the module docstring); a receive moves only earlier."""
    recvs = {placement.message(i): i for i in ops if i.op in (Op.RECV_ACT, Op.RECV_GRAD)}
    send_order = {src: [recvs[msg] for msg in messages] for src, messages in sent.items()}
    position = {id(r): (src, n) for src, seq in send_order.items() for n, r in enumerate(seq)}
    done = {src: 0 for src in send_order}
    out: list[Instruction] = []
    for ins in ops:
        if id(ins) not in position:
            out.append(ins)
            continue
        src, n = position[id(ins)]
        if n >= done[src]:
            out.extend(send_order[src][done[src] : n + 1])
            done[src] = n + 1
    return out
