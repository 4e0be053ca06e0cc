"""Replay per-stage instruction lists against a model of the communication library, untimed.

Both the validator (is a schedule deadlock-free?) and the communication pass (which sends must
be grouped with a receive so that it is?) ask the same question, so the model lives here once.

The model is what the executor and :class:`merak.runtime.distributed.p2p.P2P` do:

* a stage posts its instructions one **issue group** at a time: an instruction marked
  ``with_next`` joins the next one (a ``batch_isend_irecv``); every other instruction is a
  group of its own. The stage moves on when every point-to-point member of the group
  completed; compute never waits;
* a message is three sends on its channel: header, structure description, payload. A p2p
  group's receives run in :data:`P2P_ROUNDS` rounds, as the p2p layer does: the headers, the
  descriptions, then the payloads (each round needs the one before to size its buffers). The
  group's sends need no such wait, so all three parts of every send are posted with its first
  round: a peer receiving from this stage never waits for this stage's own receives (with
  sends posted round by round, a group receiving a message that depends on one it sends
  would deadlock). Headers and descriptions are a few bytes, so *eager*: such a send completes
  without its receiver, as NCCL's small-message protocol and gloo do. A round ends when its
  receives completed, the last one also when the group's payload sends did;
* a payload send completes at once (``buffered``: gloo, small messages) or only when the
  matching receive is posted at the same time (``rendezvous``: NCCL with large messages, and
  ``MERAK_P2P=rendezvous``), possibly inside the peer's group; receives block until their send
  is posted;
* ``rounds=1`` models the CUDA order instead (:class:`~merak.runtime.distributed.p2p.P2P`'s
  ``sends_with_payload``): the device runs one NCCL group per exchange, its payload sends and
  receives posted together, headers having gone ahead on the host;
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

#: Rounds a p2p group receives in: headers and structure descriptions (eager), payloads.
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


def groups_of(ops: Sequence[Instruction], start: int = 0) -> list[list[int]]:
    """Positions of ``ops`` split into issue groups (``with_next`` joins the next instruction),
    from position ``start`` on."""
    groups: list[list[int]] = []
    current: list[int] = []
    for pos in range(start, len(ops)):
        ins = ops[pos]
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
    schedule: Sequence[Sequence[Instruction]], semantics: str = "rendezvous", placement: Placement | None = None,
    rounds: int = P2P_ROUNDS,
) -> Stall | None:
    """Run the model over all stages; ``None`` if every stage finishes, else where they stall.
    ``placement`` routes messages between ranks (default: the schedule's own, see
    :func:`~merak.runtime.pipeline.placement.placement_of`).

    Event-driven: a stage is looked at again only when something it may wait for changed, so
    the replay costs about one visit per posting step (P=16, M=64 in a few tens of ms).
    """
    return Replay(schedule, semantics, placement, rounds).run()


Msg = tuple[Channel, int, int]  # (channel, index of the message on it, round)


class Replay:
    """A resumable replay: :meth:`run` goes as far as the schedule allows; after a stall,
    :meth:`rewrite` changes a stalled stage's list from its current group on and :meth:`run`
    continues from where it stopped.

    Why resumable: the communication pass repairs a stall by regrouping one send and asks again.
    Progress never depends on timing, so the state reached before the stall is the same after
    the rewrite (only instructions from the stalled group on moved); replaying from scratch per
    repair cost O(fixes x length) - about ten seconds per virtual-stage schedule at P=8.
    """

    def __init__(
        self, schedule: Sequence[Sequence[Instruction]], semantics: str = "rendezvous",
        placement: Placement | None = None, rounds: int = P2P_ROUNDS,
    ) -> None:
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        self.schedule = [list(ops) for ops in schedule]
        self.semantics = semantics
        if rounds not in (1, P2P_ROUNDS):
            raise ValueError(f"rounds must be {P2P_ROUNDS} (the host order) or 1 (the CUDA order), got {rounds}")
        self.rounds, self.payload = rounds, rounds - 1
        self.placement = placement_of(schedule, placement)
        self.steps = [_posting_steps(ops, 0, rounds) for ops in self.schedule]
        # keyed by instruction, not position, so that a rewrite moving sends keeps them valid
        # (instructions are unique per stage; grouping is not part of their equality)
        self.slot: dict[Instruction, tuple[Channel, int]] = {}
        for ops in self.schedule:
            self.slot.update(_fifo_slots(ops, self.placement))
        self.at = [0] * len(self.schedule)
        self.posted_sends: dict[Msg, Instruction] = {}  # currently posted
        self.posted_recvs: dict[Msg, Instruction] = {}
        self.ever_sent: set[Msg] = set()
        self.done: set[tuple[Instruction, int]] = set()  # (instruction, round)
        self.barrier: set[int] = set()
        self.todo: set[int] = set()
        for stage in range(len(self.schedule)):
            self.todo |= self._post(stage)

    def current(self, stage: int) -> tuple[list[int], int] | None:
        return self.steps[stage][self.at[stage]] if self.at[stage] < len(self.steps[stage]) else None

    def _p2p(self, stage: int) -> list[tuple[int, Instruction, Msg]]:
        step = self.current(stage)
        if step is None:
            return []
        members, rnd = step
        ops = self.schedule[stage]
        return [(pos, ops[pos], (*self.slot[ops[pos]], rnd)) for pos in members if ops[pos].op in P2P_PEER]

    def _eager(self, msg: Msg) -> bool:
        return msg[2] < self.payload or self.semantics == "buffered"

    def _post(self, stage: int) -> set[int]:
        """Post ``stage``'s current step; complete what it matches; return stages to revisit.
        Members already complete (a step re-posted after :meth:`rewrite`) are skipped."""
        woken = {stage}
        rnd = self.current(stage)[1] if self.current(stage) else 0
        for _, ins, msg in self._p2p(stage):
            if is_send(ins):
                if rnd == 0:
                    woken |= self._post_send(ins, msg[:2])
                continue
            if (ins, rnd) in self.done:
                continue
            else:
                peer = self.posted_sends.pop(msg, None)
                if peer is not None:  # a rendezvous send waits posted: both complete
                    self.done.update({(ins, rnd), (peer, rnd)})
                    woken.add(peer.stage)
                elif msg in self.ever_sent and self._eager(msg):
                    self.done.add((ins, rnd))
                else:
                    self.posted_recvs[msg] = ins
        return woken

    def _post_send(self, ins: Instruction, slot: tuple[Channel, int]) -> set[int]:
        """Post all parts of a message; complete the receives of them already waiting."""
        woken: set[int] = set()
        for rnd in range(self.rounds):
            msg = (*slot, rnd)
            if (ins, rnd) in self.done:
                continue
            self.ever_sent.add(msg)
            peer = self.posted_recvs.get(msg)
            if peer is not None:  # its receive waits posted: both complete
                self.done.update({(ins, rnd), (peer, rnd)})
                woken.add(peer.stage)
            elif self._eager(msg):
                self.done.add((ins, rnd))
            else:
                self.posted_sends[msg] = ins
        return woken

    def _waits_on(self, stage: int) -> list[tuple[int, Instruction, Msg]]:
        """The members the current step waits for: its round's receives, and in the last round
        the group's payload sends too."""
        step = self.current(stage)
        return [(pos, ins, msg) for pos, ins, msg in self._p2p(stage)
                if not is_send(ins) or (step is not None and step[1] == self.payload)]

    def _complete(self, stage: int) -> bool:
        step = self.current(stage)
        return step is not None and all((ins, step[1]) in self.done for _, ins, _ in self._waits_on(stage))

    def _unpost(self, stage: int, sends: bool) -> None:
        for _, ins, msg in self._p2p(stage):
            if is_send(ins) and not sends:
                continue
            posted = self.posted_sends if is_send(ins) else self.posted_recvs
            key = (*msg[:2], self.payload) if is_send(ins) else msg
            if posted.get(key) is ins:
                del posted[key]

    def _advance(self, stage: int) -> set[int]:
        step = self.current(stage)
        self._unpost(stage, sends=step is not None and step[1] == self.payload)
        self.at[stage] += 1
        return self._post(stage)

    def _at_barrier(self, stage: int) -> bool:
        step = self.current(stage)
        return step is not None and self.schedule[stage][step[0][0]].op is Op.REDUCE_TIED_GRADS

    def run(self) -> Stall | None:
        """Replay until every stage finished (``None``) or none can move (the stall)."""
        num_stages = len(self.schedule)
        todo = self.todo
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
            pending[stage] = [pos for pos, ins, _ in self._p2p(stage)
                              if (ins, self.payload if is_send(ins) else rnd) not in self.done]
        return Stall(waiting, pending)

    def rewrite(self, stage: int, ops: Sequence[Instruction]) -> None:
        """Replace stalled ``stage``'s list by ``ops``, which must keep every instruction before
        the current group in place and the order on every channel (the pass only delays sends
        to a later receive). The current group is posted again from its first round; what of it
        already completed stays complete, wherever it moved."""
        step = self.current(stage)
        if step is None:
            raise ValueError(f"stage {stage} finished; nothing to rewrite")
        members, _ = step
        start, old, ops = members[0], self.schedule[stage], list(ops)
        if len(ops) != len(old) or ops[start] != old[start] and not is_send(old[start]):
            raise ValueError(f"stage {stage}: a rewrite may only move sends from position {start} on")
        self._unpost(stage, sends=True)
        self.barrier.discard(stage)
        self.schedule[stage] = ops
        keep = self.steps[stage][: self.at[stage] - step[1]]  # the steps before the current group
        self.steps[stage] = keep + _posting_steps(ops, start, self.rounds)
        self.at[stage] = len(keep)
        self.todo |= self._post(stage)


def _posting_steps(ops: Sequence[Instruction], start: int = 0, p2p_rounds: int = P2P_ROUNDS
                   ) -> list[tuple[list[int], int]]:
    """A stage's issue groups as (positions, round): p2p groups once per round, others once;
    from position ``start`` on (a group's first member)."""
    out: list[tuple[list[int], int]] = []
    for members in groups_of(ops, start):
        rounds = p2p_rounds if any(ops[pos].op in P2P_PEER for pos in members) else 1
        out.extend((members, rnd) for rnd in range(rounds))
    return out


def _fifo_slots(ops: Sequence[Instruction], placement: Placement) -> dict[Instruction, tuple[Channel, int]]:
    """Each of a stage's p2p instructions -> (channel, index of its message there). A channel's
    sends are all on one stage and its receives on another, so each stage's indices follow from
    its own list."""
    count: dict[tuple[Channel, bool], int] = {}
    out: dict[Instruction, tuple[Channel, int]] = {}
    for ins in ops:
        if ins.op in P2P_PEER:
            key = (channel_of(ins, placement), is_send(ins))
            out[ins] = (key[0], count.get(key, 0))
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
