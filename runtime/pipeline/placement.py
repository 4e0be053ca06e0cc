"""Which rank runs which model chunk when a pipeline has virtual stages.

The partitioner cuts the model into ``P·v`` chunks (*virtual stages* ``0 .. P·v-1``, in model
order) and each of the ``P`` pipeline ranks holds ``v`` of them. Two placements are in use:

* **loop** (interleaved 1F1B, Megatron's virtual pipeline): rank ``r`` holds ``r, r+P, r+2P, ...``;
  a micro-batch loops through the ranks ``v`` times, always handed to the next rank.
* **v** (ZB-V, DualPipeV): ``v = 2`` and rank ``r`` holds ``r`` and ``2P-1-r``; a micro-batch
  goes down the ranks and comes back up, so rank 0 holds the first and the last chunk and
  rank ``P-1`` hands its first chunk's output to its own second chunk without a message.

``v = 1`` is the plain pipeline: chunk 0 of rank ``r`` is virtual stage ``r``.

Everything that routes a micro-batch (communication pass, validator, simulator, executor,
partitioner) asks this one object, so no module re-derives the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from merak.runtime.pipeline.instructions import Instruction, Op

#: Placement styles accepted by :class:`Placement`.
STYLES = ("loop", "v")


@dataclass(frozen=True)
class Placement:
    """``num_ranks`` pipeline ranks with ``num_chunks`` chunks each, placed in ``style``."""

    num_ranks: int
    num_chunks: int = 1
    style: str = "loop"

    def __post_init__(self) -> None:
        if self.num_ranks < 1 or self.num_chunks < 1:
            raise ValueError(f"placement needs >= 1 rank and chunk, got {self.num_ranks} ranks, {self.num_chunks} chunks")
        if self.style not in STYLES:
            raise ValueError(f"unknown placement style {self.style!r}; choose one of {STYLES}")
        if self.style == "v" and self.num_chunks != 2:
            raise ValueError(f"the V placement holds exactly 2 chunks per rank, got {self.num_chunks}")

    @classmethod
    def flat(cls, num_ranks: int) -> "Placement":
        """One chunk per rank: the pipeline without virtual stages."""
        return cls(num_ranks, 1, "loop")

    @property
    def num_virtual(self) -> int:
        """How many chunks the model is cut into (``P·v``)."""
        return self.num_ranks * self.num_chunks

    def virtual_stage(self, rank: int, chunk: int) -> int:
        """The model-order index of ``rank``'s ``chunk``."""
        if not (0 <= rank < self.num_ranks and 0 <= chunk < self.num_chunks):
            raise IndexError(f"(rank {rank}, chunk {chunk}) outside {self}")
        if self.style == "v" and chunk == 1:
            return 2 * self.num_ranks - 1 - rank
        return chunk * self.num_ranks + rank

    def locate(self, virtual_stage: int) -> tuple[int, int]:
        """Inverse of :meth:`virtual_stage`: ``(rank, chunk)`` holding that model chunk."""
        if not 0 <= virtual_stage < self.num_virtual:
            raise IndexError(f"virtual stage {virtual_stage} outside 0..{self.num_virtual - 1}")
        p = self.num_ranks
        if self.style == "v" and virtual_stage >= p:
            return 2 * p - 1 - virtual_stage, 1
        return virtual_stage % p, virtual_stage // p

    def chunks_of(self, rank: int) -> list[int]:
        """Virtual stages held by ``rank``, indexed by chunk."""
        return [self.virtual_stage(rank, c) for c in range(self.num_chunks)]

    def is_first(self, rank: int, chunk: int) -> bool:
        """Whether this chunk takes the model's inputs (virtual stage 0)."""
        return self.virtual_stage(rank, chunk) == 0

    def is_last(self, rank: int, chunk: int) -> bool:
        """Whether this chunk computes the loss (the last virtual stage)."""
        return self.virtual_stage(rank, chunk) == self.num_virtual - 1

    def next(self, rank: int, chunk: int) -> tuple[int, int] | None:
        """``(rank, chunk)`` that consumes this chunk's activations, ``None`` after the last."""
        k = self.virtual_stage(rank, chunk)
        return None if k == self.num_virtual - 1 else self.locate(k + 1)

    def prev(self, rank: int, chunk: int) -> tuple[int, int] | None:
        """``(rank, chunk)`` whose activations this chunk consumes, ``None`` for the first."""
        k = self.virtual_stage(rank, chunk)
        return None if k == 0 else self.locate(k - 1)

    def peer(self, ins: Instruction) -> int:
        """The rank a point-to-point instruction talks to."""
        near = self.next if ins.op in (Op.SEND_ACT, Op.RECV_GRAD) else self.prev
        if ins.op not in (Op.SEND_ACT, Op.RECV_GRAD, Op.SEND_GRAD, Op.RECV_ACT):
            raise ValueError(f"{ins} is not a point-to-point instruction")
        other = near(ins.stage, ins.chunk)
        if other is None:
            raise ValueError(f"{ins}: virtual stage {self.virtual_stage(ins.stage, ins.chunk)} has no peer that way")
        return other[0]

    def message(self, ins: Instruction) -> tuple[str, int, int]:
        """What a point-to-point instruction carries: ``(kind, sending virtual stage,
        micro-batch)``, the same for a send and the receive that matches it."""
        k = self.virtual_stage(ins.stage, ins.chunk)
        if ins.op is Op.SEND_ACT or ins.op is Op.SEND_GRAD:
            sender = k
        else:
            sender = k - 1 if ins.op is Op.RECV_ACT else k + 1
        kind = "act" if ins.op in (Op.SEND_ACT, Op.RECV_ACT) else "grad"
        assert ins.microbatch is not None
        return (kind, sender, ins.microbatch)

    def __str__(self) -> str:
        return f"{self.num_ranks} ranks x {self.num_chunks} chunks ({self.style})"


class PlacedSchedule(list):
    """Every rank's instruction list (a plain ``list`` of lists) that also remembers its
    :class:`Placement`, so passes handed only the schedule still route messages right."""

    def __init__(self, lists: Any = (), placement: Placement | None = None) -> None:
        super().__init__(lists)
        self.placement = placement or Placement.flat(len(self))


def placement_of(schedule: Any, placement: Placement | None = None) -> Placement:
    """``placement`` if given, else the schedule's own, else one chunk per rank."""
    if placement is not None:
        return placement
    return getattr(schedule, "placement", None) or Placement.flat(len(schedule))
