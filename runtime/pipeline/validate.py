"""Prove a set of per-stage instruction lists is executable before anything runs.

Three independent checks, cheapest first, each raising :class:`ScheduleError` that names the
stage, the offending instruction and the reason:

1. **per-stage lifecycle**: every micro-batch is loaded, received, forwarded exactly once,
   recomputed at most once (between forward and backward), backwarded exactly once after
   its forward (``B``, or ``BI`` then ``W``), and sent on where the pipeline needs it; the
   step ends with ``REDUCE_TIED_GRADS``, ``REDUCE_DP_GRADS``, ``OPTIMIZER_STEP`` once each,
   after all micro-batch work.
2. **FIFO channels**: the executor matches messages between two stages in one direction in
   order, without tags, so the order of sends must equal the order of receives on every
   channel. With virtual stages one channel may carry several kinds of message (activations
   of one chunk, gradients of another); a message is ``(kind, sending virtual stage,
   micro-batch)`` (:meth:`Placement.message`).
3. **no deadlock**: replay all stages (:mod:`merak.runtime.pipeline.replay`) with
   *rendezvous* sends - a payload send completes only while its receive is posted, so two
   ranks sending to each other must each issue that send in one group with their receive
   (NCCL with large messages) - blocking receives and ``REDUCE_TIED_GRADS`` as a barrier of
   all stages. Rendezvous is the strict model: a schedule that passes it also runs with
   buffered sends (gloo).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from merak.runtime.pipeline.instructions import Instruction, Op, P2P_PEER
from merak.runtime.pipeline.placement import Placement, placement_of
from merak.runtime.pipeline.replay import Channel, channel_of, facing_sends, is_send, replay
from merak.runtime.pipeline.schedules.common import STEP_END_OPS
from merak.runtime.pipeline.schedules.memory import peak_inflight

#: What one message carries: (kind "act" or "grad", sending virtual stage, micro-batch).
Message = tuple[str, int, int]


class ScheduleError(ValueError):
    """A schedule cannot run as written."""

    def __init__(self, stage: int, instruction: Instruction | str | None, reason: str) -> None:
        self.stage = stage
        self.instruction = instruction
        self.reason = reason
        where = f"stage {stage}" + (f", instruction {instruction}" if instruction is not None else "")
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class ValidationReport:
    num_microbatches: int
    peak_inflight: list[int]


def validate(schedule: Sequence[Sequence[Instruction]], placement: Placement | None = None) -> ValidationReport:
    """Run all checks (see module docstring); return per-stage peak in-flight micro-batches.

    ``placement`` defaults to the schedule's own (:func:`placement_of`): one chunk per stage
    for a plain list of lists.
    """
    if not schedule:
        raise ScheduleError(0, None, "schedule has no stages")
    placement = placement_of(schedule, placement)
    if placement.num_ranks != len(schedule):
        raise ScheduleError(0, None, f"placement has {placement.num_ranks} ranks, schedule {len(schedule)}")
    num_mb = _num_microbatches(schedule)
    for stage, ops in enumerate(schedule):
        _check_lifecycle(ops, stage, placement, num_mb)
    check_fifo(schedule, placement)
    check_deadlock_free(schedule, placement, "rendezvous")
    return ValidationReport(num_mb, [peak_inflight(ops) for ops in schedule])


def message_of(ins: Instruction, placement: Placement) -> Message:
    """What a p2p instruction sends or expects (see :data:`Message`)."""
    return placement.message(ins)


def _num_microbatches(schedule: Sequence[Sequence[Instruction]]) -> int:
    forwards = [ins.microbatch for ins in schedule[0] if ins.op is Op.FORWARD]
    if not forwards:
        raise ScheduleError(0, None, "stage forwards no micro-batch")
    return max(forwards) + 1


# --- 1. per-stage lifecycle -------------------------------------------------------------

#: For each micro-batch instruction: the instructions of the same micro-batch that must come
#: earlier on the stage. Alternatives are tuples ("B or BI").
_NEEDS: dict[Op, tuple[tuple[Op, ...], ...]] = {
    Op.LOAD: (),
    Op.RECV_ACT: (),
    Op.FORWARD: ((Op.LOAD,),),
    Op.SEND_ACT: ((Op.FORWARD,),),
    Op.RECOMPUTE: ((Op.FORWARD,),),
    Op.RECV_GRAD: (),
    Op.BACKWARD: ((Op.FORWARD,),),
    Op.BACKWARD_INPUT: ((Op.FORWARD,),),
    Op.BACKWARD_WEIGHT: ((Op.BACKWARD_INPUT,),),
    Op.SEND_GRAD: ((Op.BACKWARD, Op.BACKWARD_INPUT),),
}
_BACKWARDS = (Op.BACKWARD, Op.BACKWARD_INPUT)


def _remote_p2p(stage: int, chunk: int, placement: Placement) -> set[Op]:
    """The p2p instructions a chunk needs: those toward neighbours held by another rank."""
    prev, nxt = placement.prev(stage, chunk), placement.next(stage, chunk)
    ops: set[Op] = set()
    if prev is not None and prev[0] != stage:
        ops |= {Op.RECV_ACT, Op.SEND_GRAD}
    if nxt is not None and nxt[0] != stage:
        ops |= {Op.SEND_ACT, Op.RECV_GRAD}
    return ops


def _required_ops(p2p: set[Op]) -> list[tuple[Op, ...]]:
    """Instructions every micro-batch must have on a chunk (alternatives as tuples)."""
    return [(Op.LOAD,), (Op.FORWARD,), _BACKWARDS] + [(op,) for op in P2P_PEER if op in p2p]


def _check_lifecycle(ops: Sequence[Instruction], stage: int, placement: Placement, num_mb: int) -> None:
    chunks = range(placement.num_chunks)
    seen: dict[tuple[int, int], set[Op]] = {(c, mb): set() for c in chunks for mb in range(num_mb)}
    step_end: list[Op] = []
    allowed = {c: _remote_p2p(stage, c, placement) for c in chunks}
    for ins in ops:
        if ins.stage != stage:
            raise ScheduleError(stage, ins, f"instruction belongs to stage {ins.stage}")
        if ins.microbatch is None:
            _check_step_end(ins, stage, step_end, seen)
            continue
        if ins.chunk not in allowed:
            raise ScheduleError(stage, ins, f"chunk {ins.chunk} outside 0..{placement.num_chunks - 1}")
        fail = _lifecycle_violation(ins, seen, step_end, allowed[ins.chunk], num_mb) or _local_hop_violation(
            ins, seen, placement)
        if fail:
            raise ScheduleError(stage, ins, fail)
        seen[ins.key].add(ins.op)
    for (chunk, mb), done in seen.items():
        for alternatives in _required_ops(allowed[chunk]):
            if not done.intersection(alternatives):
                missing = Instruction(alternatives[0], stage, mb, chunk)
                raise ScheduleError(stage, missing, f"micro-batch {mb} never gets {alternatives[0].name}")
        if Op.BACKWARD_INPUT in done and Op.BACKWARD_WEIGHT not in done:
            missing = Instruction(Op.BACKWARD_WEIGHT, stage, mb, chunk)
            raise ScheduleError(stage, missing, f"micro-batch {mb} has BACKWARD_INPUT but no BACKWARD_WEIGHT")


def _local_hop_violation(
    ins: Instruction, seen: dict[tuple[int, int], set[Op]], placement: Placement
) -> str | None:
    """A chunk fed by another chunk of the same rank (the turn of a V, or ``P = 1``) must run
    its forward after that chunk's, and its input-gradient pass before that chunk's."""
    if ins.op is Op.FORWARD:
        near, needs = placement.prev(ins.stage, ins.chunk), (Op.FORWARD,)
    elif ins.op in _BACKWARDS:
        near, needs = placement.next(ins.stage, ins.chunk), _BACKWARDS
    else:
        return None
    if near is None or near[0] != ins.stage:
        return None
    if not seen[(near[1], ins.microbatch)].intersection(needs):
        return f"{ins.op.name} before {needs[0].name} of micro-batch {ins.microbatch} on chunk {near[1]} (same rank)"
    return None
    if tuple(step_end) != STEP_END_OPS:
        raise ScheduleError(stage, None, f"step must end with {[o.name for o in STEP_END_OPS]} once each, got {[o.name for o in step_end]}")


def _lifecycle_violation(
    ins: Instruction, seen: dict[tuple[int, int], set[Op]], step_end: list[Op], allowed_p2p: set[Op], num_mb: int
) -> str | None:
    """Why ``ins`` cannot come at this point of its stage's list, or None if it can."""
    mb, op = ins.microbatch, ins.op
    if step_end:
        return f"micro-batch work after {step_end[0].name}"
    if not 0 <= mb < num_mb:
        return f"micro-batch {mb} outside 0..{num_mb - 1} (stage 0 forwards {num_mb})"
    if op in P2P_PEER and op not in allowed_p2p:
        return f"{op.name} has no peer stage"
    done = seen[ins.key]
    if op in done:
        return f"{op.name} of micro-batch {mb} appears twice"
    if op in _BACKWARDS and done.intersection(_BACKWARDS):
        return f"micro-batch {mb} is back-propagated twice"
    for alternatives in _NEEDS.get(op, ()):
        if not done.intersection(alternatives):
            return f"{op.name} before {'/'.join(a.name for a in alternatives)} of micro-batch {mb}"
    if op is Op.FORWARD and Op.RECV_ACT in allowed_p2p and Op.RECV_ACT not in done:
        return f"FORWARD before RECV_ACT of micro-batch {mb}"
    if op in _BACKWARDS and Op.RECV_GRAD in allowed_p2p and Op.RECV_GRAD not in done:
        return f"{op.name} before RECV_GRAD of micro-batch {mb}"
    if op is Op.RECOMPUTE and done.intersection(_BACKWARDS):
        return f"RECOMPUTE after the backward of micro-batch {mb}"
    return None


def _check_step_end(
    ins: Instruction, stage: int, step_end: list[Op], seen: dict[tuple[int, int], set[Op]]
) -> None:
    if not step_end and ins.op is STEP_END_OPS[0]:
        pending = [mb if not chunk else f"{mb} (chunk {chunk})" for (chunk, mb), done in seen.items()
                   if Op.BACKWARD_INPUT in done and Op.BACKWARD_WEIGHT not in done]
        if pending:
            raise ScheduleError(stage, ins, f"weight gradients of micro-batches {pending} not computed before the reduction")
    step_end.append(ins.op)
    if tuple(step_end) != STEP_END_OPS[: len(step_end)]:
        raise ScheduleError(stage, ins, f"step must end with {[o.name for o in STEP_END_OPS]} in that order, once each")


# --- 2. FIFO channels -------------------------------------------------------------------


def _describe(message: Message, placement: Placement) -> str:
    kind, sender, mb = message
    what = "activations" if kind == "act" else "gradients"
    if placement.num_chunks == 1:
        return f"{what} of micro-batch {mb}"
    return f"{what} of micro-batch {mb} from virtual stage {sender}"


def check_fifo(schedule: Sequence[Sequence[Instruction]], placement: Placement | None = None) -> None:
    """Every channel's receives must ask for messages in the order they are sent."""
    placement = placement_of(schedule, placement)
    sent: dict[Channel, list[Message]] = {}
    received: dict[Channel, list[Instruction]] = {}
    for ops in schedule:
        for ins in ops:
            if ins.op in P2P_PEER:
                if is_send(ins):
                    sent.setdefault(channel_of(ins, placement), []).append(placement.message(ins))
                else:
                    received.setdefault(channel_of(ins, placement), []).append(ins)
    for channel in sorted(set(sent) | set(received)):
        src, dst = channel
        sends, recvs = sent.get(channel, []), received.get(channel, [])
        for pos, recv in enumerate(recvs):
            if pos >= len(sends):
                raise ScheduleError(dst, recv, f"stage {src} sends only {len(sends)} messages to stage {dst}")
            if sends[pos] != placement.message(recv):
                raise ScheduleError(
                    dst, recv,
                    f"FIFO mismatch on the channel {src}->{dst}: message #{pos} carries "
                    f"{_describe(sends[pos], placement)} (messages have no tags)",
                )
        if len(sends) > len(recvs):
            raise ScheduleError(src, None, f"{len(sends) - len(recvs)} messages to stage {dst} are never received")


# --- 3. deadlock freedom ----------------------------------------------------------------


def check_deadlock_free(
    schedule: Sequence[Sequence[Instruction]], placement: Placement | None = None, semantics: str = "rendezvous"
) -> None:
    """Replay every stage (:func:`merak.runtime.pipeline.replay.replay`); raise
    :class:`ScheduleError` if some stage can never finish. Two stages that each wait on a send
    to the other are reported as an unpaired facing exchange, naming both and both sends."""
    placement = placement_of(schedule, placement)
    stall = replay(schedule, semantics, placement)
    if stall is None:
        return
    facing = facing_sends(schedule, stall, placement)
    if facing is not None:
        (stage, pos), (peer, other) = facing
        ins, theirs = schedule[stage][pos], schedule[peer][other]
        raise ScheduleError(
            stage, ins,
            f"deadlock under {semantics} semantics: unpaired facing exchange - stage {stage} sends "
            f"{ins} while stage {peer} sends {theirs}; each send waits for the other's receive. "
            f"Issue each send in one group with its receive from the same neighbour (the "
            f"communication pass pairs them)",
        )
    first = min(stall.waiting)
    text = ", ".join(f"stage {s} waits at {' '.join(map(str, g))}" for s, g in stall.waiting.items())
    raise ScheduleError(first, stall.waiting[first][0], f"deadlock under {semantics} semantics: {text}")
