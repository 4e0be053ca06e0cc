"""Replay per-stage instruction lists against a model of the communication library, untimed.

Both the validator (is a schedule deadlock-free?) and the communication pass (which sends must
be grouped with a receive so that it is?) ask the same question, so the model lives here once.

The model is what the executor and :class:`merak.runtime.distributed.p2p.P2P` do:

* a stage posts its instructions one **issue group** at a time: an instruction marked
  ``with_next`` joins the next one (a ``batch_isend_irecv``); every other instruction is a
  group of its own. The stage moves on when every point-to-point member of the group
  completed; compute never waits;
* a p2p group runs in :data:`P2P_ROUNDS` rounds, as the p2p layer does: the headers of all its
  messages, the structure descriptions, then the payloads. The first two are a few bytes, so
  *eager*: such a send completes without its receiver, as NCCL's small-message protocol and
  gloo do. A round ends when all its members completed;
* a payload send completes at once (``buffered``: gloo, small messages) or only when the
  matching receive is posted at the same time (``rendezvous``: NCCL with large messages, and
  ``MERAK_P2P=rendezvous``), possibly inside the peer's group; receives block until their send
  is posted;
* ``REDUCE_TIED_GRADS`` is a barrier of all stages (the worst case: which stages share tied
  parameters is unknown here).

Progress depends only on what is posted, never on timing, so one untimed replay decides
whether *any* execution can hang.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from merak.runtime.pipeline.instructions import Instruction, Op, P2P_PEER
from merak.runtime.pipeline.placement import Placement, placement_of

#: A directed link between two ranks: (sending stage, receiving stage). Messages on it are
#: matched in FIFO order whatever they carry (the p2p layer sends no tags).
Channel = tuple[int, int]

#: How a payload send completes (see the module docstring).
SEMANTICS = ("rendezvous", "buffered")

#: Rounds a p2p group is posted in: headers and structure descriptions (eager), payloads.
P2P_ROUNDS = 3


def is_send(ins: Instruction) -> bool:
    return ins.op in (Op.SEND_ACT, Op.SEND_GRAD)


def peer_of(ins: Instruction, placement: Placement | None = None) -> int:
    """The rank a p2p instruction talks to (the neighbouring stage without a placement)."""
    return placement.peer(ins) if placement is not None else ins.stage + P2P_PEER[ins.op]


def channel_of(ins: Instruction, placement: Placement | None = None) -> Channel:
    """The channel a p2p instruction uses, as (sender, receiver)."""
    peer = peer_of(ins, placement)
    return (ins.stage, peer) if is_send(ins) else (peer, ins.stage)


def groups_of(ops: Sequence[Instruction]) -> list[list[int]]:
    """Positions of ``ops`` split into issue groups (``with_next`` joins the next instruction)."""
    groups: list[list[int]] = []
    current: list[int] = []
    for pos, ins in enumerate(ops):
        current.append(pos)
        if not ins.with_next:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class Stall:
    """Where a replay stopped: for each unfinished stage, the instructions of the group it waits
    in and the positions of its members that have not completed."""

    waiting: dict[int, list[Instruction]]
    pending: dict[int, list[int]]


def replay(
    schedule: Sequence[Sequence[Instruction]], semantics: str = "rendezvous", placement: Placement | None = None
) -> Stall | None:
    """Run the model over all stages; ``None`` if every stage finishes, else where they stall.
    ``placement`` routes messages between ranks (default: the schedule's own, see
    :func:`~merak.runtime.pipeline.placement.placement_of`).

    Event-driven: a stage is looked at again only when something it may wait for changed, so
    the replay costs about one visit per posting step (P=16, M=64 in a few tens of ms).
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    return _Replay(schedule, semantics, placement_of(schedule, placement)).run()


Msg = tuple[Channel, int, int]  # (channel, index of the message on it, round)


class _Replay:
    def __init__(self, schedule: Sequence[Sequence[Instruction]], semantics: str, placement: Placement) -> None:
        self.schedule, self.semantics = schedule, semantics
        self.steps = [_posting_steps(ops) for ops in schedule]
        self.slot = _fifo_slots(schedule, placement)
        self.at = [0] * len(schedule)
        self.posted_sends: dict[Msg, tuple[int, int]] = {}  # currently posted -> (stage, position)
        self.posted_recvs: dict[Msg, tuple[int, int]] = {}
        self.ever_sent: set[Msg] = set()
        self.done: set[tuple[int, int, int]] = set()  # (stage, position, round)
        self.barrier: set[int] = set()

    def current(self, stage: int) -> tuple[list[int], int] | None:
        return self.steps[stage][self.at[stage]] if self.at[stage] < len(self.steps[stage]) else None

    def _p2p(self, stage: int) -> list[tuple[int, Instruction, Msg]]:
        step = self.current(stage)
        if step is None:
            return []
        members, rnd = step
        return [(pos, self.schedule[stage][pos], (*self.slot[(stage, pos)], rnd))
                for pos in members if self.schedule[stage][pos].op in P2P_PEER]

    def _eager(self, msg: Msg) -> bool:
        return msg[2] < P2P_ROUNDS - 1 or self.semantics == "buffered"

    def _post(self, stage: int) -> set[int]:
        """Post ``stage``'s current step; complete what it matches; return stages to revisit."""
        woken = {stage}
        rnd = self.current(stage)[1] if self.current(stage) else 0
        for pos, ins, msg in self._p2p(stage):
            if is_send(ins):
                self.ever_sent.add(msg)
                peer = self.posted_recvs.get(msg)
                if peer is not None:  # its receive waits posted: both complete
                    self.done.update({(stage, pos, rnd), (*peer, rnd)})
                    woken.add(peer[0])
                elif self._eager(msg):
                    self.done.add((stage, pos, rnd))
                else:
                    self.posted_sends[msg] = (stage, pos)
            else:
                peer = self.posted_sends.pop(msg, None)
                if peer is not None:  # a rendezvous send waits posted: both complete
                    self.done.update({(stage, pos, rnd), (*peer, rnd)})
                    woken.add(peer[0])
                elif msg in self.ever_sent and self._eager(msg):
                    self.done.add((stage, pos, rnd))
                else:
                    self.posted_recvs[msg] = (stage, pos)
        return woken

    def _complete(self, stage: int) -> bool:
        step = self.current(stage)
        return step is not None and all((stage, pos, step[1]) in self.done for pos, _, _ in self._p2p(stage))

    def _advance(self, stage: int) -> set[int]:
        for pos, ins, msg in self._p2p(stage):
            (self.posted_sends if is_send(ins) else self.posted_recvs).pop(msg, None)
        self.at[stage] += 1
        return self._post(stage)

    def _at_barrier(self, stage: int) -> bool:
        step = self.current(stage)
        return step is not None and self.schedule[stage][step[0][0]].op is Op.REDUCE_TIED_GRADS

    def run(self) -> Stall | None:
        num_stages = len(self.schedule)
        todo: set[int] = set()
        for stage in range(num_stages):
            todo |= self._post(stage)
        while todo:
            stage = todo.pop()
            if self._at_barrier(stage):
                self.barrier.add(stage)
                if len(self.barrier) == num_stages:
                    self.barrier.clear()
                    for s in range(num_stages):
                        todo |= self._advance(s)
                continue
            if self._complete(stage):
                todo |= self._advance(stage)
        stalled = [s for s in range(num_stages) if self.current(s) is not None]
        if not stalled:
            return None
        waiting, pending = {}, {}
        for stage in stalled:
            members, rnd = self.current(stage)  # type: ignore[misc]
            waiting[stage] = [self.schedule[stage][pos] for pos in members]
            pending[stage] = [pos for pos, _, _ in self._p2p(stage) if (stage, pos, rnd) not in self.done]
        return Stall(waiting, pending)


def _posting_steps(ops: Sequence[Instruction]) -> list[tuple[list[int], int]]:
    """A stage's issue groups as (positions, round): p2p groups once per round, others once."""
    out: list[tuple[list[int], int]] = []
    for members in groups_of(ops):
        rounds = P2P_ROUNDS if any(ops[pos].op in P2P_PEER for pos in members) else 1
        out.extend((members, rnd) for rnd in range(rounds))
    return out


def _fifo_slots(
    schedule: Sequence[Sequence[Instruction]], placement: Placement
) -> dict[tuple[int, int], tuple[Channel, int]]:
    """(stage, position) of each p2p instruction -> (channel, index of its message there)."""
    count: dict[tuple[Channel, bool], int] = {}
    out: dict[tuple[int, int], tuple[Channel, int]] = {}
    for stage, ops in enumerate(schedule):
        for pos, ins in enumerate(ops):
            if ins.op in P2P_PEER:
                key = (channel_of(ins, placement), is_send(ins))
                out[(stage, pos)] = (key[0], count.get(key, 0))
                count[key] = count.get(key, 0) + 1
    return out


def facing_sends(
    schedule: Sequence[Sequence[Instruction]], stall: Stall, placement: Placement | None = None
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Two stalled stages each waiting on a send to the other (the exchange rendezvous cannot
    complete unless both sides group it with their receive): ``((s, pos), (q, pos))``."""
    placement = placement_of(schedule, placement)
    for stage, positions in stall.pending.items():
        for pos in positions:
            ins = schedule[stage][pos]
            if not is_send(ins):
                continue
            peer = peer_of(ins, placement)
            for other in stall.pending.get(peer, []):
                theirs = schedule[peer][other]
                if is_send(theirs) and peer_of(theirs, placement) == stage:
                    return (stage, pos), (peer, other)
    return None
