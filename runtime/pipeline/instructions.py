"""Pipeline instructions: the vocabulary shared by schedules, the validator, the simulator and
the executor.

A schedule is a plain ``list[Instruction]`` per stage. Keeping instructions as tiny immutable
records (rather than objects with behaviour) is what lets the same list be printed, diffed in a
test, validated, simulated and executed: each of those is a separate pass over plain data.

Every instruction prints compactly as ``<stage><code><microbatch>``, e.g. ``0F1`` (stage 0,
forward of micro-batch 1), ``3B0``, ``1W5``, ``2R3`` or ``1SA2`` (send activation of
micro-batch 2). Step-level instructions without a micro-batch print as ``0OPT`` etc. A ``+``
suffix joins a point-to-point instruction to the next one in one communication group.

With virtual stages (a rank holds several model chunks, see
:mod:`merak.runtime.pipeline.placement`) ``stage`` is still the rank's pipeline position (the
index of its list) and ``chunk`` says which of its chunks the instruction works on; a chunk
other than 0 prints after a dot: ``0.1F3`` is rank 0's chunk 1 forwarding micro-batch 3.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field


class Op(enum.Enum):
    """What an instruction does. The value is the compact code used in printed schedules."""

    LOAD = "L"  # read micro-batch inputs/labels this stage needs from the data iterator
    FORWARD = "F"
    BACKWARD = "B"  # full backward: input and weight gradients together
    BACKWARD_INPUT = "BI"  # zero-bubble: gradient w.r.t. the stage input only
    BACKWARD_WEIGHT = "W"  # zero-bubble: deferred weight gradients of one micro-batch
    RECOMPUTE = "R"  # re-run a forward whose activations were dropped, before its backward
    SEND_ACT = "SA"
    RECV_ACT = "RA"
    SEND_GRAD = "SG"
    RECV_GRAD = "RG"
    REDUCE_TIED_GRADS = "TIE"
    REDUCE_DP_GRADS = "DP"
    OPTIMIZER_STEP = "OPT"


#: Instructions that do computation (the simulator charges them a cost; others are comm/sync).
COMPUTE_OPS = frozenset(
    {Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT, Op.RECOMPUTE}
)
#: Instructions that carry one micro-batch.
MICROBATCH_OPS = COMPUTE_OPS | {Op.LOAD, Op.SEND_ACT, Op.RECV_ACT, Op.SEND_GRAD, Op.RECV_GRAD}
#: Point-to-point instructions and the peer direction they talk to (+1 next stage, -1 previous).
P2P_PEER = {Op.SEND_ACT: +1, Op.RECV_ACT: -1, Op.SEND_GRAD: -1, Op.RECV_GRAD: +1}

_CODE_TO_OP = {op.value: op for op in Op}
# Longest codes first so "BI" is not read as "B" followed by garbage.
_PARSE = re.compile(
    r"^(?P<stage>\d+)(?:\.(?P<chunk>\d+))?(?P<code>"
    + "|".join(sorted((re.escape(c) for c in _CODE_TO_OP), key=len, reverse=True))
    + r")(?P<mb>\d+)?(?P<group>\+)?$"
)


@dataclass(frozen=True, slots=True)
class Instruction:
    """One step of one stage's schedule.

    ``microbatch`` is ``None`` for step-level instructions (grad reductions, optimizer step).
    ``stage`` is the pipeline stage (rank position) that executes it; ``chunk`` is which of
    that stage's model chunks it runs on (always 0 without virtual stages; step-level
    instructions cover every chunk and keep 0).
    """

    op: Op
    stage: int
    microbatch: int | None = None
    chunk: int = 0
    #: Issued in one group with the next instruction of the stage (a paired exchange, run as one
    #: ``batch_isend_irecv``): under rendezvous semantics only sends and receives of one group
    #: may complete each other. Printed as a ``+`` suffix (``1SA3+ 1RG1``). Not part of equality,
    #: so passes and tests that look instructions up by content are unaffected by grouping.
    with_next: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if (self.op in MICROBATCH_OPS) != (self.microbatch is not None):
            need = "needs" if self.op in MICROBATCH_OPS else "takes no"
            raise ValueError(f"{self.op.name} {need} a micro-batch index (got {self.microbatch})")
        if self.chunk < 0 or (self.chunk and self.microbatch is None):
            raise ValueError(f"{self.op.name}: chunk {self.chunk} is negative or on a step-level instruction")

    @property
    def key(self) -> tuple[int, int]:
        """``(chunk, microbatch)``: what per-micro-batch state is indexed by on a stage."""
        assert self.microbatch is not None, f"{self} carries no micro-batch"
        return (self.chunk, self.microbatch)

    def __str__(self) -> str:
        mb = "" if self.microbatch is None else str(self.microbatch)
        chunk = f".{self.chunk}" if self.chunk else ""
        return f"{self.stage}{chunk}{self.op.value}{mb}{'+' if self.with_next else ''}"

    __repr__ = __str__

    @classmethod
    def parse(cls, text: str) -> "Instruction":
        """Inverse of ``str()``: ``Instruction.parse("1F3") == Instruction(Op.FORWARD, 1, 3)``,
        ``Instruction.parse("0.1B2") == Instruction(Op.BACKWARD, 0, 2, chunk=1)``."""
        m = _PARSE.match(text.strip())
        if not m:
            raise ValueError(f"not an instruction: {text!r} (expected e.g. '0F1', '2B0', '0.1F3', '1OPT')")
        mb, chunk = m.group("mb"), m.group("chunk")
        return cls(_CODE_TO_OP[m.group("code")], int(m.group("stage")), None if mb is None else int(mb),
                   int(chunk) if chunk else 0, with_next=m.group("group") is not None)


def parse_schedule(text: str) -> list[Instruction]:
    """Parse a whitespace-separated schedule such as ``"0F0 0F1 0B0 0B1"`` (handy in tests)."""
    return [Instruction.parse(tok) for tok in text.split()]


def format_schedule(instructions: list[Instruction]) -> str:
    return " ".join(str(i) for i in instructions)
