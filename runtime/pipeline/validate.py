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
   channel.
3. **no deadlock**: replay all stages with buffered sends, blocking receives and
   ``REDUCE_TIED_GRADS`` as a barrier of all stages (the worst case: which stages share tied
   parameters is unknown here). The replay is untimed; any timing reaches the same end state,
   because a stage's progress depends only on which messages exist.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from merak.runtime.pipeline.instructions import Instruction, Op, P2P_PEER
from merak.runtime.pipeline.schedules.common import STEP_END_OPS
from merak.runtime.pipeline.schedules.memory import peak_inflight

#: A directed channel: (sending stage, receiving stage, message kind "act" or "grad").
Channel = tuple[int, int, str]


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


def validate(schedule: Sequence[Sequence[Instruction]]) -> ValidationReport:
    """Run all checks (see module docstring); return per-stage peak in-flight micro-batches."""
    if not schedule:
        raise ScheduleError(0, None, "schedule has no stages")
    num_mb = _num_microbatches(schedule)
    for stage, ops in enumerate(schedule):
        _check_lifecycle(ops, stage, len(schedule), num_mb)
    check_fifo(schedule)
    check_deadlock_free(schedule)
    return ValidationReport(num_mb, [peak_inflight(ops) for ops in schedule])


def channel_of(ins: Instruction) -> Channel:
    """The channel a p2p instruction uses, as (sender, receiver, kind)."""
    peer = ins.stage + P2P_PEER[ins.op]
    kind = "act" if ins.op in (Op.SEND_ACT, Op.RECV_ACT) else "grad"
    if ins.op in (Op.SEND_ACT, Op.SEND_GRAD):
        return (ins.stage, peer, kind)
    return (peer, ins.stage, kind)


def is_send(ins: Instruction) -> bool:
    return ins.op in (Op.SEND_ACT, Op.SEND_GRAD)


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


def _required_ops(stage: int, num_stages: int) -> list[tuple[Op, ...]]:
    """Instructions every micro-batch must have on this stage (alternatives as tuples)."""
    req: list[tuple[Op, ...]] = [(Op.LOAD,), (Op.FORWARD,), _BACKWARDS]
    if stage > 0:
        req += [(Op.RECV_ACT,), (Op.SEND_GRAD,)]
    if stage < num_stages - 1:
        req += [(Op.SEND_ACT,), (Op.RECV_GRAD,)]
    return req


def _check_lifecycle(ops: Sequence[Instruction], stage: int, num_stages: int, num_mb: int) -> None:
    seen: dict[int, set[Op]] = {mb: set() for mb in range(num_mb)}
    step_end: list[Op] = []
    allowed_p2p = {op for op, d in P2P_PEER.items() if 0 <= stage + d < num_stages}
    for ins in ops:
        if ins.stage != stage:
            raise ScheduleError(stage, ins, f"instruction belongs to stage {ins.stage}")
        if ins.microbatch is None:
            _check_step_end(ins, stage, step_end, seen)
            continue
        fail = _lifecycle_violation(ins, seen, step_end, allowed_p2p, num_mb)
        if fail:
            raise ScheduleError(stage, ins, fail)
        seen[ins.microbatch].add(ins.op)
    for mb, done in seen.items():
        for alternatives in _required_ops(stage, num_stages):
            if not done.intersection(alternatives):
                missing = Instruction(alternatives[0], stage, mb)
                raise ScheduleError(stage, missing, f"micro-batch {mb} never gets {alternatives[0].name}")
        if Op.BACKWARD_INPUT in done and Op.BACKWARD_WEIGHT not in done:
            missing = Instruction(Op.BACKWARD_WEIGHT, stage, mb)
            raise ScheduleError(stage, missing, f"micro-batch {mb} has BACKWARD_INPUT but no BACKWARD_WEIGHT")
    if tuple(step_end) != STEP_END_OPS:
        raise ScheduleError(stage, None, f"step must end with {[o.name for o in STEP_END_OPS]} once each, got {[o.name for o in step_end]}")


def _lifecycle_violation(
    ins: Instruction, seen: dict[int, set[Op]], step_end: list[Op], allowed_p2p: set[Op], num_mb: int
) -> str | None:
    """Why ``ins`` cannot come at this point of its stage's list, or None if it can."""
    mb, op = ins.microbatch, ins.op
    if step_end:
        return f"micro-batch work after {step_end[0].name}"
    if not 0 <= mb < num_mb:
        return f"micro-batch {mb} outside 0..{num_mb - 1} (stage 0 forwards {num_mb})"
    if op in P2P_PEER and op not in allowed_p2p:
        return f"{op.name} has no peer stage"
    done = seen[mb]
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


def _check_step_end(ins: Instruction, stage: int, step_end: list[Op], seen: dict[int, set[Op]]) -> None:
    if not step_end and ins.op is STEP_END_OPS[0]:
        pending = [mb for mb, done in seen.items() if Op.BACKWARD_INPUT in done and Op.BACKWARD_WEIGHT not in done]
        if pending:
            raise ScheduleError(stage, ins, f"weight gradients of micro-batches {pending} not computed before the reduction")
    step_end.append(ins.op)
    if tuple(step_end) != STEP_END_OPS[: len(step_end)]:
        raise ScheduleError(stage, ins, f"step must end with {[o.name for o in STEP_END_OPS]} in that order, once each")


# --- 2. FIFO channels -------------------------------------------------------------------


def check_fifo(schedule: Sequence[Sequence[Instruction]]) -> None:
    """Every channel's receives must ask for micro-batches in the order they are sent."""
    sent: dict[Channel, list[int]] = {}
    received: dict[Channel, list[Instruction]] = {}
    for ops in schedule:
        for ins in ops:
            if ins.op in P2P_PEER:
                side = sent if is_send(ins) else received
                side.setdefault(channel_of(ins), []).append(ins.microbatch if side is sent else ins)
    for channel in sorted(set(sent) | set(received)):
        src, dst, kind = channel
        sends, recvs = sent.get(channel, []), received.get(channel, [])
        for pos, recv in enumerate(recvs):
            if pos >= len(sends):
                raise ScheduleError(dst, recv, f"stage {src} sends only {len(sends)} {kind} messages to stage {dst}")
            if sends[pos] != recv.microbatch:
                raise ScheduleError(
                    dst, recv,
                    f"FIFO mismatch on the {kind} channel {src}->{dst}: message #{pos} carries "
                    f"micro-batch {sends[pos]} (messages have no tags)",
                )
        if len(sends) > len(recvs):
            raise ScheduleError(src, None, f"{len(sends) - len(recvs)} {kind} messages to stage {dst} are never received")


# --- 3. deadlock freedom ----------------------------------------------------------------


def check_deadlock_free(schedule: Sequence[Sequence[Instruction]]) -> None:
    """Replay with buffered sends and blocking receives; raise if some stage can never finish."""
    num_stages = len(schedule)
    pc = [0] * num_stages
    queues: dict[Channel, deque[int]] = {}
    at_barrier: set[int] = set()
    progressed = True
    while progressed:
        progressed = False
        for stage, ops in enumerate(schedule):
            while pc[stage] < len(ops):
                ins = ops[pc[stage]]
                if ins.op is Op.REDUCE_TIED_GRADS:
                    at_barrier.add(stage)
                    if len(at_barrier) < num_stages:
                        break
                    _release_barrier(schedule, pc)
                    progressed = True
                    continue
                if ins.op in P2P_PEER:
                    queue = queues.setdefault(channel_of(ins), deque())
                    if is_send(ins):
                        queue.append(ins.microbatch)
                    elif not queue:
                        break
                    elif queue.popleft() != ins.microbatch:
                        raise ScheduleError(stage, ins, "FIFO mismatch during replay")
                pc[stage] += 1
                progressed = True
    stuck = [(stage, schedule[stage][pc[stage]]) for stage in range(num_stages) if pc[stage] < len(schedule[stage])]
    if stuck:
        stage, ins = stuck[0]
        waits = ", ".join(f"stage {s} waits at {i}" for s, i in stuck)
        raise ScheduleError(stage, ins, f"deadlock: {waits}")


def _release_barrier(schedule: Sequence[Sequence[Instruction]], pc: list[int]) -> None:
    for stage, ops in enumerate(schedule):
        if pc[stage] < len(ops) and ops[pc[stage]].op is Op.REDUCE_TIED_GRADS:
            pc[stage] += 1
