"""Discrete-event simulation of a validated schedule: how long one step takes, where stages idle,
and which chain of instructions decides the step time.

Model (the executor's semantics, with costs attached):

* each stage runs its list in order, one instruction at a time;
* ``FORWARD`` costs F, ``BACKWARD_INPUT`` B, ``BACKWARD_WEIGHT`` W, a full ``BACKWARD`` B+W,
  ``RECOMPUTE`` R × the stage's recompute fraction; everything else takes no compute time;
* a send is buffered (the sender goes on at once); the message occupies its channel for C and
  arrives then, channels deliver in order, a receive blocks until its message has arrived;
* ``REDUCE_TIED_GRADS`` is a barrier of all stages (see ``merak.runtime.pipeline.validate``);
* with virtual stages (``v`` chunks per rank) the costs stay those of a whole stage: one chunk's
  computation takes ``1/v`` of them (the partitioner cuts ``P·v`` balanced chunks), so
  schedules with and without chunks are compared on the same model. A message still costs C.

Each executed instruction remembers which event let it start (the previous instruction on its
stage, or the message it waited for); walking those links back from the last instruction to
finish gives the critical path.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields

from merak.runtime.pipeline.instructions import COMPUTE_OPS, Instruction, Op, P2P_PEER
from merak.runtime.pipeline.placement import Placement, placement_of
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.schedules.memory import peak_activations
from merak.runtime.pipeline.validate import Channel, channel_of, is_send, validate

Cost = float | Sequence[float]


@dataclass(frozen=True)
class Costs:
    """Per-micro-batch times of one stage: scalars (same on every stage) or one value per stage.

    ``p2p`` is the time one message occupies the link it leaves on; per stage it is indexed by
    the sending stage.
    """

    forward: Cost = 1.0
    backward_input: Cost = 1.0
    backward_weight: Cost = 1.0
    recompute: Cost = 1.0
    p2p: Cost = 0.0

    @classmethod
    def parse(cls, text: str) -> "Costs":
        """``"F,B,W,R,C"`` (the CLI's ``--costs``) → Costs."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 5:
            raise ValueError(f"--costs takes 5 numbers F,B,W,R,C, got {text!r}")
        return cls(*(float(p) for p in parts))

    def of(self, name: str, stage: int) -> float:
        value = getattr(self, name)
        if isinstance(value, (int, float)):
            return float(value)
        return float(value[stage])

    def check(self, num_stages: int) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            values = [value] if isinstance(value, (int, float)) else list(value)
            if not isinstance(value, (int, float)) and len(values) != num_stages:
                raise ValueError(f"costs.{f.name} has {len(values)} entries for {num_stages} stages")
            if any(v < 0 for v in values):
                raise ValueError(f"costs.{f.name} must be >= 0, got {value}")

    def duration(self, ins: Instruction, recompute_fraction: float) -> float:
        s = ins.stage
        if ins.op is Op.FORWARD:
            return self.of("forward", s)
        if ins.op is Op.BACKWARD:
            return self.of("backward_input", s) + self.of("backward_weight", s)
        if ins.op is Op.BACKWARD_INPUT:
            return self.of("backward_input", s)
        if ins.op is Op.BACKWARD_WEIGHT:
            return self.of("backward_weight", s)
        if ins.op is Op.RECOMPUTE:
            return self.of("recompute", s) * recompute_fraction
        return 0.0


@dataclass(frozen=True)
class Interval:
    """One instruction's execution on its stage."""

    start: float
    end: float
    instruction: Instruction


@dataclass(frozen=True)
class SimulationResult:
    makespan: float
    #: idle / makespan averaged over stages (idle = makespan - busy compute time)
    bubble_ratio: float
    peak_inflight: list[int]
    #: instructions from the first to the last event of the step, each waiting on the previous
    critical_path: list[str]
    #: per stage, compute intervals in execution order (for drawing)
    busy: list[list[Interval]]
    busy_time: list[float]
    #: per stage, peak saved activations in micro-batch units (see schedules.memory)
    peak_activations: list[float]

    def summary(self) -> dict:
        """The CLI's ``--json`` object."""
        return {
            "makespan": self.makespan,
            "bubble_ratio": self.bubble_ratio,
            "peak_inflight": list(self.peak_inflight),
            "critical_path": list(self.critical_path),
        }


@dataclass
class _Node:
    """An executed instruction and the node whose completion let it start."""

    interval: Interval
    pred: "_Node | None"


@dataclass
class _Message:
    arrival: float
    cause: _Node


def simulate(
    schedule: Sequence[Sequence[Instruction]],
    costs: Costs | None = None,
    recompute_plan: RecomputePlan | None = None,
    placement: Placement | None = None,
) -> SimulationResult:
    """Validate ``schedule`` (one list per stage), then simulate one step under ``costs``.

    ``recompute_plan`` gives each stage's recompute fraction (RECOMPUTE costs R × fraction);
    without it a RECOMPUTE costs the full R. ``placement`` defaults to the schedule's own.
    """
    costs = costs or Costs()
    num_stages = len(schedule)
    costs.check(num_stages)
    placement = placement_of(schedule, placement)
    report = validate(schedule, placement)
    plan = recompute_plan or RecomputePlan.full(num_stages)
    if plan.num_stages != num_stages:
        raise ValueError(f"recompute plan has {plan.num_stages} stages, schedule has {num_stages}")
    fractions = [plan.stage_chunk_fractions(s, placement.num_chunks) for s in range(num_stages)]
    share = 1.0 / placement.num_chunks
    run = _Replay(schedule, costs, [[f * share for f in row] for row in fractions], placement, share)
    run.run()
    makespan = max((n.interval.end for n in run.last), default=0.0)
    busy = [[n.interval for n in nodes if n.interval.instruction.op in COMPUTE_OPS] for nodes in run.nodes]
    busy_time = [sum(i.end - i.start for i in intervals) for intervals in busy]
    bubble = (
        sum(makespan - b for b in busy_time) / (num_stages * makespan) if makespan > 0 else 0.0
    )
    return SimulationResult(
        makespan=makespan,
        bubble_ratio=bubble,
        peak_inflight=report.peak_inflight,
        critical_path=run.critical_path(),
        busy=busy,
        busy_time=busy_time,
        peak_activations=[peak_activations(ops, f, chunk_weight=share) for ops, f in zip(schedule, fractions)],
    )


class _Replay:
    """The event loop: a heap of (time, stage) wake-ups; each wake-up runs a stage until it
    starts a computation (it wakes again when that ends) or blocks on a receive or barrier."""

    def __init__(
        self,
        schedule: Sequence[Sequence[Instruction]],
        costs: Costs,
        fractions: Sequence[Sequence[float]],
        placement: Placement,
        share: float,
    ) -> None:
        """``fractions`` are per stage and chunk, already scaled by ``share``: the part of a
        stage's cost one chunk's recomputation takes (a RECOMPUTE costs R × fraction)."""
        self.schedule = schedule
        self.costs = costs
        self.fractions = fractions
        self.placement = placement
        self.share = share
        n = len(schedule)
        self.pc = [0] * n
        self.clock = [0.0] * n
        self.nodes: list[list[_Node]] = [[] for _ in range(n)]
        self.channels: dict[Channel, deque[_Message]] = {}
        self.channel_free: dict[Channel, tuple[float, _Node | None]] = {}
        self.blocked: dict[Channel, int] = {}
        self.barrier: dict[int, float] = {}
        self.events: list[tuple[float, int]] = [(0.0, s) for s in range(n)]

    @property
    def last(self) -> list[_Node]:
        return [nodes[-1] for nodes in self.nodes if nodes]

    def run(self) -> None:
        heapq.heapify(self.events)
        while self.events:
            time, stage = heapq.heappop(self.events)
            self.clock[stage] = max(self.clock[stage], time)
            self._advance(stage)
        unfinished = [s for s, ops in enumerate(self.schedule) if self.pc[s] < len(ops)]
        assert not unfinished, f"validated schedule stalled on stages {unfinished}"

    def _advance(self, stage: int) -> None:
        ops = self.schedule[stage]
        while self.pc[stage] < len(ops):
            ins = ops[self.pc[stage]]
            if ins.op is Op.REDUCE_TIED_GRADS:
                self._arrive_at_barrier(stage)
                return
            if ins.op in P2P_PEER and not is_send(ins):
                if not self._receive(stage, ins):
                    return
                continue
            duration = self._duration(ins)
            node = self._execute(stage, ins, self.clock[stage], self._prev(stage))
            if is_send(ins):
                self._send(ins, node)
            if duration > 0:
                heapq.heappush(self.events, (node.interval.end, stage))
                return

    def _prev(self, stage: int) -> _Node | None:
        return self.nodes[stage][-1] if self.nodes[stage] else None

    def _duration(self, ins: Instruction) -> float:
        if ins.op is Op.RECOMPUTE:  # its fraction already holds the chunk's share
            return self.costs.duration(ins, self.fractions[ins.stage][ins.chunk])
        return self.costs.duration(ins, 0.0) * self.share

    def _execute(self, stage: int, ins: Instruction, start: float, pred: _Node | None) -> _Node:
        end = start + self._duration(ins)
        node = _Node(Interval(start, end, ins), pred)
        self.nodes[stage].append(node)
        self.clock[stage] = end
        self.pc[stage] += 1
        return node

    def _send(self, ins: Instruction, node: _Node) -> None:
        channel = channel_of(ins, self.placement)
        free_at, free_cause = self.channel_free.get(channel, (0.0, None))
        depart, cause = (node.interval.end, node)
        if free_cause is not None and free_at > depart:
            depart, cause = free_at, free_cause  # waits behind the previous message
        arrival = depart + self.costs.of("p2p", ins.stage)
        self.channel_free[channel] = (arrival, cause)
        self.channels.setdefault(channel, deque()).append(_Message(arrival, cause))
        receiver = self.blocked.pop(channel, None)
        if receiver is not None:
            heapq.heappush(self.events, (max(self.clock[receiver], arrival), receiver))

    def _receive(self, stage: int, ins: Instruction) -> bool:
        channel = channel_of(ins, self.placement)
        queue = self.channels.get(channel)
        if not queue:
            self.blocked[channel] = stage
            return False
        msg = queue.popleft()
        ready = self.clock[stage]
        # Ties go to the message: the cross-stage dependency is the one worth showing.
        start, pred = (msg.arrival, msg.cause) if msg.arrival >= ready else (ready, self._prev(stage))
        self._execute(stage, ins, start, pred)
        return True

    def _arrive_at_barrier(self, stage: int) -> None:
        self.barrier[stage] = self.clock[stage]
        if len(self.barrier) < len(self.schedule):
            return
        latest = max(self.barrier, key=lambda s: (self.barrier[s], -s))
        release = self.barrier[latest]
        cause = self._prev(latest)
        for s in self.barrier:
            ins = self.schedule[s][self.pc[s]]
            self._execute(s, ins, release, cause if s != latest else self._prev(s))
            heapq.heappush(self.events, (release, s))
        self.barrier.clear()

    def critical_path(self) -> list[str]:
        last = self.last
        if not last:
            return []
        node: _Node | None = max(last, key=lambda n: n.interval.end)
        path: list[str] = []
        while node is not None:
            path.append(str(node.interval.instruction))
            node = node.pred
        return path[::-1]
