"""Schedules as data: the public contract, the shape of each family's lists, the recompute plan,
the instruction text form, and the validator catching broken schedules."""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest

from merak.runtime.pipeline.instructions import Instruction, Op, format_schedule, parse_schedule
from merak.runtime.memory.recompute_plan import RECOMPUTE_MODES, RecomputePlan
from merak.runtime.pipeline.schedule import SCHEDULES, VIRTUAL_SCHEDULES, build, build_all, placement_for
from merak.runtime.pipeline.schedules.common import STEP_END_OPS
from merak.runtime.pipeline.schedules.memory import peak_activations, peak_inflight
from merak.runtime.pipeline.replay import groups_of, replay
from merak.runtime.pipeline.validate import ScheduleError, check_deadlock_free, validate

# Dense where schedules change shape (M around P, M < P), sparse up to the P ≤ 16, M ≤ 64 limit.
GRID = sorted(
    {(p, m) for p in range(1, 17) for m in {1, 2, max(1, p - 1), p, p + 1, 2 * p + 1}}
    | {(p, 64) for p in (1, 2, 5, 16)}
    | {(16, 48), (12, 36), (9, 27)}
)


@functools.cache
def built(name: str, p: int, m: int, mode: str = "none") -> tuple[tuple[Instruction, ...], ...]:
    """build_all (validating) once per configuration; the grid tests share the results."""
    return tuple(map(tuple, build_all(name, p, m, RecomputePlan.from_mode(mode, p))))


def ops_of(stage_ops: list[Instruction], mb: int) -> list[Op]:
    return [i.op for i in stage_ops if i.microbatch == mb]


# --- contract ---------------------------------------------------------------------------


def test_schedule_names_are_the_contract() -> None:
    assert SCHEDULES == ("gpipe", "1f1b", "shifted_critical_path", "zero_bubble",
                         "interleaved_1f1b", "zb_v", "dualpipe_v")
    assert VIRTUAL_SCHEDULES == ("interleaved_1f1b", "zb_v", "dualpipe_v")


#: (P, M) a virtual-stage schedule refuses, with the words its error must contain.
REFUSED = {
    "interleaved_1f1b": (lambda p, m: m % p != 0, "multiple of the pipeline stages"),
    "dualpipe_v": (lambda p, m: m < 2 * p, "at least 2P"),
}


#: The grid in two parts: up to P = 8 in the default run, the rest (P up to 16, where each build
#: replays the exchanges under rendezvous semantics twice) in the slow one, which keeps the default
#: suite within its time budget. Every test that walks the grid takes a part.
GRID_PARTS = [pytest.param([(p, m) for p, m in GRID if p <= 8], id="p8"),
              pytest.param([(p, m) for p, m in GRID if p > 8], id="p16", marks=pytest.mark.slow)]


@pytest.mark.parametrize("grid", GRID_PARTS)
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
def test_every_schedule_validates_over_the_grid(name: str, grid: list, mode: str) -> None:
    """Every (P, M) builds and validates, or (virtual stages) is refused with an error that
    says which M would do."""
    refused, words = REFUSED.get(name, (lambda p, m: False, ""))
    for p, m in grid:
        if refused(p, m):
            with pytest.raises(ValueError, match=words):
                built(name, p, m, mode)
            continue
        assert len(built(name, p, m, mode)) == p


@pytest.mark.parametrize("name", SCHEDULES)
def test_build_returns_the_stage_row_of_build_all(name: str) -> None:
    plan = RecomputePlan.full(4)
    everything = build_all(name, 4, 8, plan)  # M = 8: a size every schedule takes
    assert [build(name, 4, 8, s, plan) for s in range(4)] == everything
    assert all(ins.stage == s for s, ops in enumerate(everything) for ins in ops)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        build_all("interleaved", 2, 2)
    with pytest.raises(ValueError, match="stage_id"):
        build("1f1b", 2, 2, 2)
    with pytest.raises(ValueError, match="num_microbatches"):
        build_all("1f1b", 2, 0)
    with pytest.raises(ValueError, match="recompute plan has 3 stages"):
        build_all("1f1b", 2, 2, RecomputePlan.full(3))


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_stage_loads_and_ends_the_step(name: str) -> None:
    """Each (chunk, micro-batch) a rank works on is loaded exactly once, before anything else
    (M = 6 at P = 3: a size every schedule takes)."""
    schedule = build_all(name, 3, 6, RecomputePlan.full(3))
    for ops in schedule:
        assert tuple(i.op for i in ops[-3:]) == STEP_END_OPS
        for key in {i.key for i in ops if i.microbatch is not None}:
            key_ops = [i.op for i in ops if i.microbatch is not None and i.key == key]
            assert key_ops.count(Op.LOAD) == 1 and key_ops[0] is Op.LOAD
        assert {i.microbatch for i in ops if i.op is Op.LOAD} == set(range(6))


# --- family shapes ----------------------------------------------------------------------


def test_gpipe_runs_all_forwards_first() -> None:
    compute = [i.op for i in build("gpipe", 3, 4, 1) if i.op in (Op.FORWARD, Op.BACKWARD)]
    assert compute == [Op.FORWARD] * 4 + [Op.BACKWARD] * 4


@pytest.mark.parametrize("p,m", [(4, 8), (5, 3), (2, 7)])
def test_1f1b_warmup_and_peak_inflight(p: int, m: int) -> None:
    schedule = build_all("1f1b", p, m)
    for s, ops in enumerate(schedule):
        compute = [i for i in ops if i.op in (Op.FORWARD, Op.BACKWARD)]
        first_b = next(k for k, i in enumerate(compute) if i.op is Op.BACKWARD)
        assert first_b == min(p - s, m)  # P-1-s warm-up forwards plus the first steady one
    assert validate(schedule).peak_inflight == [min(p - s, m) for s in range(p)]


def test_1f1b_receives_the_gradient_before_recomputing() -> None:
    ops = build("1f1b", 4, 8, 1, RecomputePlan.full(4))
    text = format_schedule(ops)
    assert "1RG3 1R3 1B3" in text


def test_shifted_recomputes_before_the_gradient_arrives() -> None:
    ops = build("shifted_critical_path", 4, 8, 1, RecomputePlan.full(4))
    # the recomputation comes before the receive; a send grouped with that receive
    # (rendezvous pairing) may sit between them
    assert re.search(r"1R3 (1SA\d+\+ )?1RG3 1B3", format_schedule(ops))


@pytest.mark.parametrize("grid", GRID_PARTS)
def test_shifted_last_stage_never_recomputes(grid: list) -> None:
    for p, m in grid:
        schedule = built("shifted_critical_path", p, m, "full")
        assert not any(i.op is Op.RECOMPUTE for i in schedule[-1])


def test_shifted_runs_the_third_forward_early_on_stage_p_minus_2() -> None:
    ops = build("shifted_critical_path", 4, 8, 2, RecomputePlan.full(4))
    compute = [str(i) for i in ops if i.op in (Op.FORWARD, Op.BACKWARD)]
    assert compute[:6] == ["2F0", "2F1", "2F2", "2B0", "2B1", "2F3"]


def test_shifted_keeps_exactly_the_microbatches_memory_allows() -> None:
    """With full recomputation: micro-batch 0 on every stage, everything on the last stage."""
    schedule = build_all("shifted_critical_path", 4, 8, RecomputePlan.full(4))
    kept = [[mb for mb in range(8) if Op.RECOMPUTE not in ops_of(ops, mb)] for ops in schedule]
    assert kept == [[0], [0], [0], list(range(8))]


@pytest.mark.parametrize("grid", GRID_PARTS)
@pytest.mark.parametrize("mode", ["full", "stage_aware"])
def test_shifted_never_peaks_above_1f1b_with_the_same_plan(mode: str, grid: list) -> None:
    for p, m in grid:
        plan = RecomputePlan.from_mode(mode, p)
        shifted, baseline = built("shifted_critical_path", p, m, mode), built("1f1b", p, m, mode)
        for s in range(p):
            f = plan.fraction(s)
            assert peak_activations(shifted[s], f) <= peak_activations(baseline[s], f) + 1e-9, (p, m, s)


def test_shifted_without_recompute_is_1f1b() -> None:
    assert build_all("shifted_critical_path", 5, 9) == build_all("1f1b", 5, 9)


@pytest.mark.parametrize("grid", GRID_PARTS)
def test_zero_bubble_splits_every_backward_and_matches_1f1b_peak(grid: list) -> None:
    for p, m in grid:
        schedule = built("zero_bubble", p, m)
        assert not any(i.op is Op.BACKWARD for ops in schedule for i in ops)
        one_f_one_b = built("1f1b", p, m)
        assert max(map(peak_inflight, schedule)) == max(map(peak_inflight, one_f_one_b)), (p, m)


def test_zero_bubble_last_stage_defers_weight_passes() -> None:
    ops = build("zero_bubble", 4, 8, 3)
    compute = [str(i) for i in ops if i.op in (Op.FORWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT)]
    assert compute[:9] == ["3F0", "3BI0", "3F1", "3BI1", "3F2", "3BI2", "3F3", "3BI3", "3W0"]


# --- recompute plan ---------------------------------------------------------------------


def test_recompute_plan_constructors() -> None:
    assert RecomputePlan.none(3).fractions == (0.0, 0.0, 0.0)
    assert RecomputePlan.full(2).fractions == (1.0, 1.0)
    assert RecomputePlan.from_mode("full", 2) == RecomputePlan.full(2)
    assert RecomputePlan.stage_aware(1).fractions == (0.0,)


def test_stage_aware_balances_the_1f1b_activation_peak() -> None:
    plan = RecomputePlan.stage_aware(4)
    assert plan.fractions == pytest.approx((0.5, 0.25, 0.0, 0.0))
    keep = [1 - f for f in plan.fractions]
    # while one micro-batch is back-propagated, P-1-s others sit with their kept share
    peaks = [1 + (4 - 1 - s) * keep[s] for s in range(3)]
    assert peaks[0] == peaks[1] == pytest.approx(2.5) and peaks[2] <= 2.5
    assert plan.recomputes(0) and not plan.recomputes(3)


def test_recompute_plan_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="outside"):
        RecomputePlan((0.5, 1.5))
    with pytest.raises(ValueError, match="unknown recompute mode"):
        RecomputePlan.from_mode("some", 2)
    with pytest.raises(ValueError):
        RecomputePlan.none(0)


# --- instruction text form --------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_instruction_print_parse_round_trip(name: str) -> None:
    for ops in build_all(name, 3, 6, RecomputePlan.full(3)):
        assert parse_schedule(format_schedule(ops)) == ops
        assert all(Instruction.parse(str(i)) == i for i in ops)


def test_instruction_parse_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        Instruction.parse("0X1")


# --- validator catches broken schedules --------------------------------------------------

STEP_END = "{s}TIE {s}DP {s}OPT"


def two_stage(stage0: str, stage1: str) -> list[list[Instruction]]:
    return [
        parse_schedule(stage0 + " " + STEP_END.format(s=0)),
        parse_schedule(stage1 + " " + STEP_END.format(s=1)),
    ]


GOOD0 = "0L0 0F0 0SA0 0RG0 0B0"
GOOD1 = "1L0 1RA0 1F0 1B0 1SG0"


def test_validator_accepts_a_hand_written_schedule() -> None:
    assert validate(two_stage(GOOD0, GOOD1)).peak_inflight == [1, 1]


def test_validator_catches_a_deadlock() -> None:
    # stage 0 waits for the gradient before sending the activation stage 1 waits for
    with pytest.raises(ScheduleError, match="deadlock") as err:
        validate(two_stage("0L0 0F0 0RG0 0SA0 0B0", GOOD1))
    assert err.value.stage == 0 and str(err.value.instruction) == "0RG0"


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
def test_every_registered_schedule_is_deadlock_free_under_rendezvous(name: str, mode: str) -> None:
    # SCHEDULES is the registry: a schedule added later is covered without editing this test
    refused, _ = REFUSED.get(name, (lambda p, m: False, ""))
    for p in (2, 3, 4, 8):
        for m in (p, 2 * p, 4 * p + 1):
            if refused(p, m):
                continue
            schedule = built(name, p, m, mode)  # build_all validates under rendezvous ...
            check_deadlock_free(schedule, placement_for(name, p), "rendezvous")  # ... said here
            # and in the CUDA order: one NCCL group per exchange, payload sends with the receives
            assert replay(schedule, "rendezvous", placement_for(name, p), rounds=1) is None, (name, p, m, mode)


def test_the_communication_pass_pairs_facing_exchanges() -> None:
    # 1F1B steady state, stage 1 of 4: send activation + receive gradient from stage 2 in one
    # group, send gradient + receive activation from stage 0 in the next
    ops = build("1f1b", 4, 8, 1)
    text = format_schedule(ops)
    assert "1SA2+ 1RG0 1B0" in text and "1SG0+ 1RA3 1F3" in text
    assert [[str(ops[i]) for i in g] for g in groups_of(ops) if len(g) > 1][:2] == [["1SA2+", "1RG0"], ["1SG0+", "1RA3"]]


def test_rendezvous_rejects_an_unpaired_facing_exchange() -> None:
    # the same 1F1B lists with the groups removed: stage 0 sends activation 1 while stage 1
    # sends gradient 0, each send waiting for a receive the other has not reached
    paired = build_all("1f1b", 2, 2)
    unpaired = [[dataclasses.replace(i, with_next=False) for i in ops] for ops in paired]
    check_deadlock_free(unpaired, semantics="buffered")  # buffered sends (gloo) never notice
    with pytest.raises(ScheduleError, match="unpaired facing exchange") as err:
        check_deadlock_free(unpaired, semantics="rendezvous")
    text = str(err.value)
    assert "stage 0" in text and "stage 1" in text and "0SA1" in text and "1SG0" in text
    # the CUDA order (one device group per exchange) needs the pairing as much
    assert replay(unpaired, "rendezvous", rounds=1) is not None and replay(paired, "rendezvous", rounds=1) is None


def test_grouped_instructions_print_and_parse_with_a_plus() -> None:
    ops = parse_schedule("1SA3+ 1RG1 1B1")
    assert ops[0].with_next and not ops[1].with_next
    assert format_schedule(ops) == "1SA3+ 1RG1 1B1"


def test_validator_catches_a_fifo_mismatch() -> None:
    stage0 = "0L0 0F0 0SA0 0L1 0F1 0SA1 0RG0 0B0 0RG1 0B1"
    stage1 = "1L1 1RA1 1L0 1RA0 1F0 1F1 1B0 1SG0 1B1 1SG1"
    with pytest.raises(ScheduleError, match="FIFO") as err:
        validate(two_stage(stage0, stage1))
    assert err.value.stage == 1 and str(err.value.instruction) == "1RA1"


def test_validator_catches_backward_before_forward() -> None:
    with pytest.raises(ScheduleError, match="before FORWARD") as err:
        validate(two_stage(GOOD0, "1L0 1RA0 1B0 1F0 1SG0"))
    assert err.value.stage == 1 and str(err.value.instruction) == "1B0"


@pytest.mark.parametrize(
    "stage1,reason",
    [
        ("1L0 1RA0 1F0 1B0 1R0 1SG0", "RECOMPUTE after the backward"),
        ("1L0 1RA0 1F0 1B0 1B0 1SG0", "twice"),
        ("1L0 1RA0 1F0 1B0", "never gets SEND_GRAD"),
        ("1RA0 1F0 1B0 1SG0", "FORWARD before LOAD"),
        ("1L0 1RA0 1F0 1SA0 1B0 1SG0", "no peer"),
    ],
)
def test_validator_catches_lifecycle_errors(stage1: str, reason: str) -> None:
    with pytest.raises(ScheduleError, match=reason):
        validate(two_stage(GOOD0, stage1))


def test_validator_requires_weight_gradients_before_the_reduction() -> None:
    stage1 = parse_schedule("1L0 1RA0 1F0 1BI0 1SG0 1TIE 1W0 1DP 1OPT")
    with pytest.raises(ScheduleError, match="not computed before the reduction"):
        validate([parse_schedule(GOOD0 + " " + STEP_END.format(s=0)), stage1])


def test_validator_requires_the_step_end_in_order() -> None:
    schedule = two_stage(GOOD0, GOOD1)
    schedule[1][-3:] = parse_schedule("1DP 1TIE 1OPT")
    with pytest.raises(ScheduleError, match="in that order"):
        validate(schedule)
