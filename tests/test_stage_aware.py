"""Stage-aware recomputation per (rank, chunk) for the virtual-stage schedules
(``merak.runtime.memory.stage_aware``): in-flight counts read from each schedule's instruction
list, and the per-chunk plans, against values worked out by hand from the schedules' orders."""

from __future__ import annotations

import json

import pytest

from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.memory.stage_aware import (
    chunk_inflight, rank_keeps, stage_aware_plan, stage_aware_target, virtual_stage_fractions,
)
from merak.runtime.pipeline.instructions import Op
from merak.runtime.pipeline.placement import Placement
from merak.runtime.pipeline.schedule import build_all, main, placement_for
from merak.runtime.pipeline.schedules import one_f_one_b
from merak.runtime.pipeline.simulate import Costs, simulate

VIRTUAL = ("interleaved_1f1b", "zb_v", "dualpipe_v")


def _v_counts(p: int) -> tuple[tuple[int, int], ...]:
    """ZB-V and DualPipeV: virtual stage k holds 2P-k micro-batches (a 1F1B over 2P half
    stages); rank r holds k = r (chunk 0) and k = 2P-1-r (chunk 1)."""
    return tuple((2 * p - r, r + 1) for r in range(p))


#: (schedule, P, M) -> per rank, per chunk peak in flight. Interleaved (v=2): rank r warms up with
#: 2(P-1-r) + P forwards in groups of P per chunk, so at P=4 ranks 0 and 1 forward all 8 of chunk
#: 0 before its first backward, rank 2 seven, rank 3 five; chunk 1 peaks at 4, 4, 3, 1.
COUNTS = {
    ("interleaved_1f1b", 2, 4): ((4, 2), (3, 1)),
    ("interleaved_1f1b", 4, 8): ((8, 4), (8, 4), (7, 3), (5, 1)),
    ("zb_v", 2, 4): _v_counts(2),
    ("zb_v", 4, 8): _v_counts(4),
    ("dualpipe_v", 2, 4): _v_counts(2),
    ("dualpipe_v", 4, 8): _v_counts(4),
}


@pytest.mark.parametrize("schedule, p, m", list(COUNTS))
def test_chunk_inflight_counts_are_read_from_the_schedule(schedule, p, m):
    built = build_all(schedule, p, m)
    assert chunk_inflight(built, 2) == COUNTS[(schedule, p, m)]


#: (schedule, P, M) -> {rank: per chunk recompute fraction}, target 1 + (P-1)/2 (1.5 at P=2,
#: 2.5 at P=4), worked out from the walked peaks as linear functions of λ (module docstring):
#: e.g. zb_v P=2 rank 0 (counts 4, 1): chunk 0 keeps λ/3, the peak is 0.5 + λ/2 (three of its
#: micro-batches kept and chunk 1's forward whole) -> λ = 2, chunk 0 drops 1/3; interleaved P=4
#: rank 0 (8, 4): binding at chunk 0's first backward, 0.5 + 23λ/21 -> λ = 42/23.
PLANS = {
    ("interleaved_1f1b", 2, 4): {0: (0.75, 0.25), 1: (0.0, 0.0)},
    ("zb_v", 2, 4): {0: (1 / 3, 0.0), 1: (0.5, 0.0)},
    ("dualpipe_v", 2, 4): {0: (2 / 3, 0.0), 1: (2 / 3, 1 / 3)},
    ("interleaved_1f1b", 4, 8): {0: (17 / 23, 9 / 23), 3: (0.0, 0.0)},
    ("zb_v", 4, 8): {0: (3 / 7, 0.0)},
    ("dualpipe_v", 4, 8): {0: (4 / 7, 0.0)},
}


@pytest.mark.parametrize("schedule, p, m", list(PLANS))
def test_per_chunk_plan_matches_hand_computed_fractions(schedule, p, m):
    plan = stage_aware_plan(schedule, p, m)
    assert plan.activation_budget == pytest.approx(1 + (p - 1) * 0.5)
    for rank, expected in PLANS[(schedule, p, m)].items():
        assert plan.stage_chunk_fractions(rank, 2) == pytest.approx(expected, abs=1e-7), rank
        assert plan.fraction(rank) == pytest.approx(sum(expected) / 2, abs=1e-7)


@pytest.mark.parametrize("p", [2, 3, 4])
def test_one_chunk_per_rank_reproduces_the_1f1b_rule(p):
    """The per-chunk rule on 1F1B's own lists is Merak's 1F1B rule (k_s ∝ 1/(P-1-s))."""
    compute = one_f_one_b.compute_order(p, 2 * p)
    target = stage_aware_target(p, 2 * p)
    dropped = tuple(1.0 - rank_keeps(ops, 1, target)[0] for ops in compute)
    assert dropped == pytest.approx(RecomputePlan.stage_aware(p).fractions, abs=1e-7)
    assert stage_aware_plan("1f1b", p, 2 * p) == RecomputePlan.stage_aware(p)


@pytest.mark.parametrize("schedule", VIRTUAL)
@pytest.mark.parametrize("p, m", [(2, 4), (4, 8)])
def test_schedules_recompute_only_the_chunks_that_drop_and_stay_within_the_target(schedule, p, m):
    """Built with the per-chunk plan, a schedule puts RECOMPUTE only on chunks with a non-zero
    fraction, and every rank's simulated activation peak stays within the plan's activation
    budget (the 1F1B rule's), below the schedule's own peak without recomputation."""
    plan = stage_aware_plan(schedule, p, m)
    assert max(simulate(build_all(schedule, p, m)).peak_activations) > plan.activation_budget
    built = build_all(schedule, p, m, plan)
    for rank, ops in enumerate(built):
        chunks = {i.chunk for i in ops if i.op is Op.RECOMPUTE}
        assert chunks <= {c for c, f in enumerate(plan.stage_chunk_fractions(rank, 2)) if f > 0}, rank
    result = simulate(built, recompute_plan=plan)
    assert max(result.peak_activations) <= plan.activation_budget + 1e-6


def test_virtual_stage_fractions_follow_the_placement():
    plan = stage_aware_plan("zb_v", 2, 4)
    # V placement: virtual stages 0, 1 are chunk 0 of ranks 0, 1; 2, 3 chunk 1 of ranks 1, 0
    assert virtual_stage_fractions(plan, placement_for("zb_v", 2)) == pytest.approx((1 / 3, 0.5, 0.0, 0.0))
    loop = stage_aware_plan("interleaved_1f1b", 2, 4)
    assert virtual_stage_fractions(loop, Placement(2, 2, "loop")) == pytest.approx((0.75, 0.0, 0.25, 0.0))


def test_per_chunk_plan_validates_its_fractions():
    with pytest.raises(ValueError, match="not the mean"):
        RecomputePlan((0.5,), ((0.0, 0.0),))
    with pytest.raises(ValueError, match="outside"):
        RecomputePlan.per_chunk([(0.5, 1.5)])
    with pytest.raises(ValueError, match="chunks per stage"):
        RecomputePlan.per_chunk([(0.5, 0.5)]).stage_chunk_fractions(0, 3)


def test_schedule_cli_sizes_stage_aware_per_chunk(capsys):
    """``python -m merak.runtime.pipeline.schedule --recompute stage_aware`` with a virtual-stage
    schedule simulates the per-chunk plan."""
    assert main(["--schedule", "zb_v", "--stages", "2", "--microbatches", "4", "--recompute", "stage_aware",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = stage_aware_plan("zb_v", 2, 4)
    assert out["makespan"] == simulate(build_all("zb_v", 2, 4, plan), Costs(), plan).makespan
