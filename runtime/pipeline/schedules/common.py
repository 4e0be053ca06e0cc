"""Passes shared by every schedule family: compute order → executable instruction lists.

A family only writes each stage's *computation order* (forwards and backwards). ``lower``
turns it into what the executor runs, one pass per concern, in this order:

1. communication (``merak.runtime.pipeline.comm_pass``): RECV/SEND around each forward and backward;
2. recomputation: a ``RECOMPUTE`` before the backward of every micro-batch whose stage drops
   activations, placed either after the gradient receive (classic) or before it, so that the
   recomputation overlaps the wait (Merak's early recomputation);
3. data loading: a ``LOAD`` before the micro-batch's first instruction that needs data;
4. paired exchanges (``comm_pass.pair_exchanges``): where two neighbours send to each other,
   sends join a receive from the same neighbour in one issue group, so the schedule is
   deadlock-free under NCCL's rendezvous semantics;
5. step end: ``REDUCE_TIED_GRADS``, ``REDUCE_DP_GRADS``, ``OPTIMIZER_STEP``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from merak.runtime.pipeline.comm_pass import INPUT_GRAD_OPS, add_communication, pair_exchanges
from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.pipeline.placement import PlacedSchedule, Placement
from merak.runtime.memory.recompute_plan import RecomputePlan

#: Appended to every stage, in this order, once all micro-batches are done.
STEP_END_OPS = (Op.REDUCE_TIED_GRADS, Op.REDUCE_DP_GRADS, Op.OPTIMIZER_STEP)

Schedule = list[list[Instruction]]


def check_sizes(num_stages: int, num_microbatches: int, plan: RecomputePlan | None) -> RecomputePlan:
    """Validate the arguments every family takes; return the plan (``none`` when not given)."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if plan is None:
        return RecomputePlan.none(num_stages)
    if plan.num_stages != num_stages:
        raise ValueError(f"recompute plan has {plan.num_stages} stages, schedule has {num_stages}")
    return plan


def forward(stage: int, mb: int, chunk: int = 0) -> Instruction:
    return Instruction(Op.FORWARD, stage, mb, chunk)


def backward(stage: int, mb: int, chunk: int = 0) -> Instruction:
    return Instruction(Op.BACKWARD, stage, mb, chunk)


def one_f_one_b_order(
    stage: int, num_microbatches: int, warmup: int, backward_ops: Sequence[Op] = (Op.BACKWARD,)
) -> list[Instruction]:
    """``warmup`` forwards, then alternate one forward / one backward, then the remaining
    backwards. Each backward is the sequence ``backward_ops`` for that micro-batch (e.g.
    ``(BACKWARD_INPUT, BACKWARD_WEIGHT)``). ``warmup = M`` gives GPipe's order."""
    m = num_microbatches
    warmup = min(warmup, m)
    order = [forward(stage, i) for i in range(warmup)]
    for i in range(m):
        if warmup + i < m:
            order.append(forward(stage, warmup + i))
        order.extend(Instruction(op, stage, i) for op in backward_ops)
    return order


def all_recomputed(
    plan: RecomputePlan, num_microbatches: int, num_chunks: int = 1
) -> set[tuple[int, ...]]:
    """Every (stage, micro-batch) on stages whose plan drops activations; with ``num_chunks``
    above 1, every (stage, chunk, micro-batch) of the chunks that drop some (a plan may give
    each chunk its own fraction)."""
    return {
        (stage, mb) if num_chunks == 1 else (stage, chunk, mb)
        for stage in range(plan.num_stages)
        for chunk, fraction in enumerate(plan.stage_chunk_fractions(stage, num_chunks))
        if fraction > 0.0
        for mb in range(num_microbatches)
    }


def _recompute_key(item: tuple[int, ...]) -> tuple[int, int, int]:
    """(stage, micro-batch) or (stage, chunk, micro-batch) → (stage, chunk, micro-batch)."""
    return (item[0], 0, item[1]) if len(item) == 2 else (item[0], item[1], item[2])


def lower(
    compute: Sequence[Sequence[Instruction]],
    recomputed: Collection[tuple[int, ...]],
    *,
    early_recompute: bool = False,
    placement: Placement | None = None,
) -> Schedule:
    """Run the passes listed in the module docstring over per-stage compute orders.

    ``recomputed`` holds the (stage, micro-batch) pairs, or (stage, chunk, micro-batch)
    triples, that get a RECOMPUTE. The result remembers ``placement`` (one chunk per stage
    when not given), which the validator and simulator read.
    """
    placement = placement or Placement.flat(len(compute))
    schedule = add_communication(compute, placement)
    schedule = [
        insert_recompute(ops, stage, recomputed, early=early_recompute)
        for stage, ops in enumerate(schedule)
    ]
    schedule = pair_exchanges([insert_loads(ops, stage) for stage, ops in enumerate(schedule)], placement)
    return PlacedSchedule(
        [ops + [Instruction(op, stage) for op in STEP_END_OPS] for stage, ops in enumerate(schedule)],
        placement,
    )


def insert_recompute(
    ops: Sequence[Instruction],
    stage: int,
    recomputed: Collection[tuple[int, ...]],
    *,
    early: bool,
) -> list[Instruction]:
    """Put ``RECOMPUTE`` of each recomputed micro-batch right before its backward, or (``early``)
    before the gradient receive that precedes that backward."""
    wanted = {_recompute_key(item) for item in recomputed}
    out: list[Instruction] = []
    done: set[tuple[int, int]] = set()

    def recompute(ins: Instruction) -> None:
        if (stage, *ins.key) in wanted and ins.key not in done:
            done.add(ins.key)
            out.append(Instruction(Op.RECOMPUTE, stage, ins.microbatch, ins.chunk))

    for ins in ops:
        if (early and ins.op is Op.RECV_GRAD) or ins.op in INPUT_GRAD_OPS:
            recompute(ins)
        out.append(ins)
    return out


def insert_loads(ops: Sequence[Instruction], stage: int) -> list[Instruction]:
    """``LOAD`` before the first instruction of a micro-batch (of a chunk) that needs its data:
    the activation receive (so loading overlaps the wait) or, without one, the forward."""
    out: list[Instruction] = []
    loaded: set[tuple[int, int]] = set()
    for ins in ops:
        if ins.op in (Op.RECV_ACT, Op.FORWARD) and ins.key not in loaded:
            loaded.add(ins.key)
            out.append(Instruction(Op.LOAD, stage, ins.microbatch, ins.chunk))
        out.append(ins)
    return out


def move_after(ops: list[Instruction], moved: Instruction, anchor: Instruction) -> None:
    """Move ``moved`` to just after ``anchor`` in place (used to delay a send)."""
    ops.remove(moved)
    ops.insert(ops.index(anchor) + 1, moved)


class ChunkCounter:
    """Writes one rank's compute order for schedules built from phases: each ``emit(op, chunk)``
    appends that op for the chunk's next micro-batch (each kind of each chunk runs its
    micro-batches in order, which is what keeps every channel FIFO)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.next: dict[tuple[Op, int], int] = {}
        self.out: list[Instruction] = []

    def emit(self, op: Op, chunk: int) -> Instruction:
        """Append ``op`` for ``chunk``'s next micro-batch. A full backward and an
        input-gradient pass share one count (a micro-batch gets one or the other)."""
        counted = Op.BACKWARD_INPUT if op is Op.BACKWARD else op
        mb = self.next.get((counted, chunk), 0)
        self.next[(counted, chunk)] = mb + 1
        ins = Instruction(op, self.rank, mb, chunk)
        self.out.append(ins)
        return ins

    def count(self, op: Op, chunk: int) -> int:
        return self.next.get((Op.BACKWARD_INPUT if op is Op.BACKWARD else op, chunk), 0)
