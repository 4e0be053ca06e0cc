"""How much of each pipeline stage's forward is recomputed instead of kept.

A plan is just one number per stage. Schedules read it to decide where ``RECOMPUTE``
instructions go, the simulator charges ``recompute_cost * fraction`` for each of them, and the
executor's per-layer actions (:class:`merak.runtime.memory.policy.ActivationPlan`, whose
``recompute_plan()`` produces this object from layer counts) decide what is dropped. Keeping it a
frozen value object lets a memory-budget planner hand an explicit plan to the same code paths as
the fixed rules below.

With virtual stages a rank's chunks may drop different fractions (:meth:`RecomputePlan.per_chunk`;
the stage-aware rule sizes them per chunk, :mod:`merak.runtime.memory.stage_aware`): the
schedules then recompute only the chunks that drop something and price each chunk with its own
fraction, while ``fractions`` stays the rank's mean (what a rank-level reader such as the 1F1B
budget sees). ``activation_budget`` records the activation peak such a plan was sized for, so a
schedule dropping redundant recomputation stays under it rather than under the default (1F1B's
peak with the same plan).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Names accepted by :meth:`RecomputePlan.from_mode` (and the ``--recompute`` CLI flag).
RECOMPUTE_MODES = ("none", "full", "selective", "stage_aware")

#: Stage 0's kept fraction under the stage-aware rule (DESIGN.md: "stage-0 ratio 0.5").
DEFAULT_FIRST_STAGE_KEEP = 0.5


@dataclass(frozen=True)
class RecomputePlan:
    """Per stage, the fraction of the stage's forward whose activations are dropped after the
    forward and recomputed before the backward (0 = keep everything, 1 = full recomputation)."""

    fractions: tuple[float, ...]
    #: Per stage (rank), one fraction per model chunk; empty: every chunk drops its rank's fraction.
    chunk_fractions: tuple[tuple[float, ...], ...] = ()
    #: The activation peak per rank, in micro-batches of a whole stage, the plan was sized for
    #: (``None``: 1F1B's peak with the same plan, see ``schedules.recompute.plan_recomputation``).
    activation_budget: float | None = None

    def __post_init__(self) -> None:
        fractions = tuple(float(f) for f in self.fractions)
        if not fractions:
            raise ValueError("a recompute plan needs one fraction per stage (got none)")
        for stage, f in enumerate(fractions):
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"stage {stage}: recompute fraction {f} is outside [0, 1]")
        chunks = tuple(tuple(float(f) for f in row) for row in self.chunk_fractions)
        if chunks:
            if len(chunks) != len(fractions):
                raise ValueError(f"recompute plan has {len(fractions)} stages but chunk fractions for {len(chunks)}")
            for stage, row in enumerate(chunks):
                if not row or len(row) != len(chunks[0]):
                    raise ValueError(f"stage {stage}: {len(row)} chunk fractions, stage 0 has {len(chunks[0])}")
                for chunk, f in enumerate(row):
                    if not 0.0 <= f <= 1.0:
                        raise ValueError(f"stage {stage} chunk {chunk}: recompute fraction {f} is outside [0, 1]")
                if abs(sum(row) / len(row) - fractions[stage]) > 1e-9:
                    raise ValueError(f"stage {stage}: fraction {fractions[stage]} is not the mean of its chunks' {row}")
        if self.activation_budget is not None and self.activation_budget <= 0:
            raise ValueError(f"activation_budget must be positive, got {self.activation_budget}")
        object.__setattr__(self, "fractions", fractions)
        object.__setattr__(self, "chunk_fractions", chunks)

    @property
    def num_stages(self) -> int:
        return len(self.fractions)

    def fraction(self, stage: int) -> float:
        return self.fractions[stage]

    def recomputes(self, stage: int) -> bool:
        """Whether ``stage`` drops any activations (and so needs RECOMPUTE instructions)."""
        return self.fractions[stage] > 0.0

    def chunk_fraction(self, stage: int, chunk: int) -> float:
        """The fraction ``stage``'s model chunk ``chunk`` drops (the stage's own without
        per-chunk fractions)."""
        return self.chunk_fractions[stage][chunk] if self.chunk_fractions else self.fractions[stage]

    def stage_chunk_fractions(self, stage: int, num_chunks: int) -> tuple[float, ...]:
        """Every chunk's fraction on ``stage`` (``num_chunks`` of them)."""
        if self.chunk_fractions and len(self.chunk_fractions[stage]) != num_chunks:
            raise ValueError(f"recompute plan has {len(self.chunk_fractions[stage])} chunks per stage, "
                             f"the schedule {num_chunks}")
        return tuple(self.chunk_fraction(stage, c) for c in range(num_chunks))

    @classmethod
    def per_chunk(cls, chunk_fractions: Sequence[Sequence[float]],
                  activation_budget: float | None = None) -> "RecomputePlan":
        """A plan giving each rank's chunks their own fractions (``chunk_fractions[rank][chunk]``);
        the rank's ``fraction`` is their mean (each chunk weighs ``1/v`` of the rank)."""
        rows = tuple(tuple(float(f) for f in row) for row in chunk_fractions)
        return cls(tuple(sum(row) / len(row) if row else 0.0 for row in rows), rows, activation_budget)

    @classmethod
    def from_virtual_stages(cls, plan: "RecomputePlan", placement: Any,
                            activation_budget: float | None = None) -> "RecomputePlan":
        """The schedules' plan (per rank and chunk) from ``plan``, one fraction per virtual stage
        in model order, placed by ``placement`` (a ``Placement``); ``plan`` itself without chunks."""
        if placement.num_chunks == 1:
            return plan
        if plan.num_stages != placement.num_virtual:
            raise ValueError(f"recompute plan has {plan.num_stages} stages but {placement} has {placement.num_virtual} chunks")
        return cls.per_chunk([[plan.fraction(k) for k in placement.chunks_of(r)] for r in range(placement.num_ranks)],
                             activation_budget)

    @classmethod
    def none(cls, num_stages: int) -> "RecomputePlan":
        return cls((0.0,) * _positive(num_stages))

    @classmethod
    def full(cls, num_stages: int) -> "RecomputePlan":
        return cls((1.0,) * _positive(num_stages))

    @classmethod
    def stage_aware(
        cls, num_stages: int, first_stage_keep: float = DEFAULT_FIRST_STAGE_KEEP
    ) -> "RecomputePlan":
        """Merak's fixed rule, used when no memory budget is given.

        In 1F1B stage ``s`` holds ``P-s`` micro-batches in flight; while one of them is being
        recomputed and back-propagated, ``P-1-s`` others sit with their kept fraction. Keeping
        ``k_s ∝ 1/(P-1-s)`` therefore gives every stage the same activation peak
        ``1 + (P-1) * first_stage_keep`` (in micro-batch activations), the peak stage 0 has,
        so later stages spend memory that 1F1B leaves idle. The last stage (nothing else in
        flight) and any stage whose kept share would reach 1 recompute nothing.
        """
        p = _positive(num_stages)
        if not 0.0 <= first_stage_keep <= 1.0:
            raise ValueError(f"first_stage_keep must be in [0, 1], got {first_stage_keep}")
        fractions = []
        for stage in range(p):
            others_in_flight = p - 1 - stage
            if others_in_flight == 0:
                fractions.append(0.0)
                continue
            keep = min(1.0, first_stage_keep * (p - 1) / others_in_flight)
            fractions.append(1.0 - keep)
        return cls(tuple(fractions))

    @classmethod
    def from_mode(cls, mode: str, num_stages: int) -> "RecomputePlan":
        """``none | full | selective | stage_aware`` → plan (the ``recompute`` training argument).

        ``selective`` places ``RECOMPUTE`` instructions as ``full`` does (every layer of every
        stage recomputes its attention core); the simulator charges it the recompute cost it is
        given. Layer-exact fractions come from ``ActivationPlan.recompute_plan()``.
        """
        builders = {"none": cls.none, "full": cls.full, "selective": cls.full, "stage_aware": cls.stage_aware}
        if mode not in builders:
            raise ValueError(f"unknown recompute mode {mode!r}; choose one of {RECOMPUTE_MODES}")
        return builders[mode](num_stages)


def _positive(num_stages: int) -> int:
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    return num_stages
