"""Derive point-to-point instructions from a compute order.

Schedules only decide the order of computation on each stage (``F``, ``B``/``BI``, ``W``).
Where the activations and gradients travel follows from that order alone, so it is derived
here once instead of being hand-written in every schedule (the mistake-prone part of
DeepSpeed-style generators). Receives block and messages match in FIFO order per channel,
so the placement is simple:

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

Under NCCL a large send completes only when the peer posts the matching receive. In 1F1B's
steady state stage ``s`` sends activation ``j`` forward while stage ``s+1`` sends gradient
``m`` back: issued separately, each send waits for a receive the other stage has not reached.
:func:`pair_exchanges` (run last, after recomputation and loads were placed) therefore joins
such exchanges into groups (executed with ``torch.distributed.batch_isend_irecv``), delaying
a send to its receive past compute only, so an early recomputation still overlaps the
gradient wait where it can. The validator proves the result deadlock-free under these
rendezvous semantics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from merak.runtime.pipeline.instructions import COMPUTE_OPS, P2P_PEER, Instruction, Op
from merak.runtime.pipeline.placement import Placement, placement_of
from merak.runtime.pipeline.replay import Replay, facing_sends, is_send

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


def _candidates(ops: Sequence[Instruction], placement: Placement) -> dict[int, int]:
    """send position -> position of the next receive from the same neighbour, where no other
    point-to-point instruction lies between them (only compute, which the send may wait past)."""
    p2p = [pos for pos, ins in enumerate(ops) if ins.op in P2P_PEER]
    out: dict[int, int] = {}
    for here, there in zip(p2p, p2p[1:]):
        a, b = ops[here], ops[there]
        if is_send(a) and not is_send(b) and placement.peer(a) == placement.peer(b):
            out[here] = there
    return out


def pair_exchanges(
    schedule: Sequence[Sequence[Instruction]], placement: Placement | None = None
) -> list[list[Instruction]]:
    """Group facing exchanges (see module docstring); returns new per-stage lists.

    First the mirrored pairs: stage ``s`` sends ``X`` then receives ``Y`` from neighbour ``q``
    (only compute between), while ``q`` sends ``Y`` then receives ``X``. One side grouping its
    two messages is enough - the other side's lone send completes against the group's
    receive, and its later receive against the group's send, which waits posted - so the side
    whose send would be delayed past less compute groups (both when tied, as in 1F1B's
    steady state where neither passes any): the shifted schedule's early recomputation stays
    between its send and receive. Grouping moves the send down to just before its receive
    (past compute only, so no channel's order changes) and marks it ``with_next``.

    Then what mirroring cannot see (e.g. the shifted schedule's reordered stage P-2, which
    sends two activations before it receives the gradient the last stage already sends): the
    rendezvous replay is run and, while two stages stall sending to each other, one side's
    stalled send - with any later sends to the same neighbour before it - is delayed into one
    group with its next receive from that neighbour. Sends are only ever delayed, never
    reordered on a channel, so FIFO order and the data dependencies stay intact.
    """
    placement = placement_of(schedule, placement)
    cands = [_candidates(ops, placement) for ops in schedule]
    by_messages = {
        (placement.message(ops[send]), placement.message(ops[recv])): (stage, send, recv)
        for stage, (ops, c) in enumerate(zip(schedule, cands))
        for send, recv in c.items()
    }
    chosen: list[set[int]] = [set() for _ in schedule]
    for (x, y), (stage, send, recv) in by_messages.items():
        mirror = by_messages.get((y, x))
        if mirror is None:
            continue
        mine = sum(schedule[stage][p].op in COMPUTE_OPS for p in range(send + 1, recv))
        peer, psend, precv = mirror
        theirs = sum(schedule[peer][p].op in COMPUTE_OPS for p in range(psend + 1, precv))
        if mine <= theirs:
            chosen[stage].add(send)
    out = [_delay_sends(ops, _targets(ops, chosen[stage], placement)) for stage, ops in enumerate(schedule)]
    run = Replay(out, "rendezvous", placement)
    out = run.schedule  # the replay's lists: rewritten in place as sends are regrouped
    for _ in range(sum(map(len, out))):  # each fix groups at least one more send: bounded
        stall = run.run()
        if stall is None:
            break
        facing = facing_sends(out, stall, placement)
        # delay one side per round, the one whose send waits past the least compute: often
        # grouping that side alone lets the other's send complete where it stands
        options = []
        if facing is not None:
            for (stage, pos), (peer, theirs) in (facing, facing[::-1]):
                # only grouping with the receive of the message the peer is stuck sending helps:
                # the next receive from that peer, or - when the send already waits grouped with
                # another receive (a V turn) - the first receive after that group
                awaited = placement.message(out[peer][theirs])
                for target in (_targets(out[stage], {pos}, placement), _later_target(out[stage], pos, placement)):
                    if target and _changes(out[stage], target) and placement.message(out[stage][target[pos]]) == awaited:
                        options.append((stage, target))
        if not options:
            # sends grouped with the wrong receive: delay a stalled send into the group of the
            # next receive from any peer
            options = [(stage, _later_target(out[stage], pos, placement))
                       for stage, pending in stall.pending.items() for pos in pending if is_send(out[stage][pos])]
            options = [(stage, t) for stage, t in options if t]
        if not options:
            break  # nothing left to delay: the validator reports the deadlock
        stage, target = min(options, key=lambda o: _compute_passed(out[o[0]], o[1]))
        run.rewrite(stage, _delay_sends(out[stage], target))
    return out


def _targets(ops: Sequence[Instruction], sends: set[int], placement: Placement) -> dict[int, int]:
    """For each send in ``sends`` (positions), and the sends to the same neighbour between it
    and the next receive from that neighbour: send position -> that receive's position. A send
    with no later receive from its neighbour is left out (it stays where it is)."""
    target: dict[int, int] = {}
    for send in sorted(sends):
        peer, moving = placement.peer(ops[send]), [send]
        for pos in range(send + 1, len(ops)):
            if ops[pos].op in P2P_PEER and placement.peer(ops[pos]) == peer:
                if not is_send(ops[pos]):
                    target.update((p, pos) for p in moving)
                    break
                moving.append(pos)
    return target


def _later_target(ops: Sequence[Instruction], send: int, placement: Placement) -> dict[int, int]:
    """Like :func:`_targets` for one send, but toward the first receive from any peer after
    the send's current group (empty if there is none)."""
    end = send
    while ops[end].with_next:
        end += 1
    peer, moving = placement.peer(ops[send]), [send]
    for pos in range(send + 1, len(ops)):
        if ops[pos].op not in P2P_PEER:
            continue
        if pos > end and not is_send(ops[pos]):
            return {p: pos for p in moving}
        if is_send(ops[pos]) and placement.peer(ops[pos]) == peer:
            moving.append(pos)
    return {}


def _changes(ops: Sequence[Instruction], target: dict[int, int]) -> bool:
    """Whether applying ``target`` moves or newly groups any send."""
    return any(not all(ops[p].with_next for p in range(send, recv)) for send, recv in target.items())


def _compute_passed(ops: Sequence[Instruction], target: dict[int, int]) -> int:
    return sum(ops[p].op in COMPUTE_OPS for send, recv in target.items() for p in range(send + 1, recv))


def _delay_sends(ops: Sequence[Instruction], target: dict[int, int]) -> list[Instruction]:
    """Move each send in ``target`` to just before its receive, joined to it with ``with_next``."""
    first = min(target, default=len(ops))
    joining: dict[int, list[int]] = {}
    for send in sorted(target):
        joining.setdefault(target[send], []).append(send)
    out = list(ops[:first])
    for pos in range(first, len(ops)):
        ins = ops[pos]
        if pos in target:
            continue
        out.extend(dataclasses.replace(ops[p], with_next=True) for p in joining.get(pos, ()))
        out.append(ins)
    return out
