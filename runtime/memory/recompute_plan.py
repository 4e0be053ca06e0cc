"""How much of each pipeline stage's forward is recomputed instead of kept.

A plan is just one number per stage. Schedules read it to decide where ``RECOMPUTE``
instructions go, the simulator charges ``recompute_cost * fraction`` for each of them, and the
executor's per-layer actions (:class:`merak.runtime.memory.policy.ActivationPlan`, whose
``recompute_plan()`` produces this object from layer counts) decide what is dropped. Keeping it a
frozen value object lets a memory-budget planner hand an explicit plan to the same code paths as
the fixed rules below.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Names accepted by :meth:`RecomputePlan.from_mode` (and the ``--recompute`` CLI flag).
RECOMPUTE_MODES = ("none", "full", "selective", "stage_aware")

#: Stage 0's kept fraction under the stage-aware rule (DESIGN.md: "stage-0 ratio 0.5").
DEFAULT_FIRST_STAGE_KEEP = 0.5


@dataclass(frozen=True)
class RecomputePlan:
    """Per stage, the fraction of the stage's forward whose activations are dropped after the
    forward and recomputed before the backward (0 = keep everything, 1 = full recomputation)."""

    fractions: tuple[float, ...]

    def __post_init__(self) -> None:
        fractions = tuple(float(f) for f in self.fractions)
        if not fractions:
            raise ValueError("a recompute plan needs one fraction per stage (got none)")
        for stage, f in enumerate(fractions):
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"stage {stage}: recompute fraction {f} is outside [0, 1]")
        object.__setattr__(self, "fractions", fractions)

    @property
    def num_stages(self) -> int:
        return len(self.fractions)

    def fraction(self, stage: int) -> float:
        return self.fractions[stage]

    def recomputes(self, stage: int) -> bool:
        """Whether ``stage`` drops any activations (and so needs RECOMPUTE instructions)."""
        return self.fractions[stage] > 0.0

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
