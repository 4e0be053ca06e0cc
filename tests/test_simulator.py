"""The simulator against closed forms, the schedules' performance claims, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from merak.runtime.pipeline.instructions import COMPUTE_OPS, parse_schedule
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.schedule import SCHEDULES, build_all, main
from merak.runtime.pipeline.simulate import Costs, SimulationResult, simulate
from merak.runtime.pipeline.timeline import draw
from merak.runtime.pipeline.validate import ScheduleError

UNIFORM = Costs(1, 1, 1, 0, 0)  # F = B = W, no recompute, no latency
REFERENCE = Costs(1, 1, 1, 1, 0)  # F:(B+W):R = 1:2:1 (DESIGN.md's reference figures)


def run(name: str, p: int, m: int, costs: Costs = UNIFORM, mode: str = "none") -> SimulationResult:
    plan = RecomputePlan.from_mode(mode, p)
    return simulate(build_all(name, p, m, plan), costs, plan)


def idle(result: SimulationResult) -> float:
    """Idle time of the busiest-working stage: makespan minus its compute."""
    return result.makespan - max(result.busy_time)


# --- closed forms -----------------------------------------------------------------------


@pytest.mark.parametrize("p", range(1, 9))
def test_1f1b_uniform_bubble_ratio_is_exact(p: int) -> None:
    for m in (1, 2, p, p + 3, 3 * p, 24):
        result = run("1f1b", p, m)
        assert result.bubble_ratio == pytest.approx((p - 1) / (m + p - 1), abs=1e-12), (p, m)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("f,b,w", [(1, 1, 1), (1, 2, 0), (2, 1, 0.5)])
def test_gpipe_and_1f1b_makespan_closed_form(name: str, f: float, b: float, w: float) -> None:
    """Without latency both take (M+P-1)·(F+B+W): M micro-batches plus the fill and drain."""
    for p in (1, 2, 3, 5, 8):
        for m in (1, p, 2 * p + 1):
            result = run(name, p, m, Costs(f, b, w, 0, 0))
            assert result.makespan == pytest.approx((m + p - 1) * (f + b + w)), (p, m)


def test_gpipe_peak_inflight_is_all_microbatches() -> None:
    assert run("gpipe", 4, 6).peak_inflight == [6, 6, 6, 6]


def test_single_microbatch_pays_latency_once_per_hop() -> None:
    c = 0.5
    for p in (1, 2, 4):
        result = run("1f1b", p, 1, Costs(1, 1, 1, 0, c))
        assert result.makespan == pytest.approx(p * 3 + 2 * (p - 1) * c)


def test_a_channel_carries_one_message_at_a_time() -> None:
    """GPipe, P=2: with C=3 > F=1 activations queue on the link and arrive 3 apart."""
    result = run("gpipe", 2, 4, Costs(1, 1, 0, 0, 3))
    forwards = [i.start for i in result.busy[1] if i.instruction.op.name == "FORWARD"]
    assert forwards == [4, 7, 10, 13]


def test_latency_never_helps() -> None:
    for name in SCHEDULES:
        fast = run(name, 4, 8, REFERENCE, "full")
        slow = run(name, 4, 8, Costs(1, 1, 1, 1, 0.25), "full")
        assert slow.makespan > fast.makespan


def test_per_stage_costs() -> None:
    slow_stage = Costs(forward=[1, 1, 2, 1], backward_input=1, backward_weight=1, recompute=0, p2p=0)
    result = run("1f1b", 4, 8, slow_stage)
    assert result.busy_time == [24, 24, 32, 24]
    # the slow stage's work, after forwards on stages 0-1, before backwards on stages 1-0
    assert result.makespan >= 2 * 1 + 32 + 2 * 2
    with pytest.raises(ValueError, match="3 entries for 4 stages"):
        run("1f1b", 4, 8, Costs(forward=[1, 1, 1]))


def test_recompute_is_charged_by_plan_fraction() -> None:
    plan = RecomputePlan((0.5, 0.0))
    result = simulate(build_all("1f1b", 2, 4, plan), Costs(1, 1, 1, 2, 0), plan)
    assert result.busy_time == [4 * (3 + 1.0), 4 * 3]


def test_costs_parse() -> None:
    assert Costs.parse("1,2,3,4,0.5") == Costs(1, 2, 3, 4, 0.5)
    with pytest.raises(ValueError, match="5 numbers"):
        Costs.parse("1,2,3")


# --- result consistency -----------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_busy_intervals_are_sequential_and_add_up(name: str) -> None:
    result = run(name, 4, 8, REFERENCE, "full")
    for row, busy in zip(result.busy, result.busy_time):
        assert all(a.end <= b.start + 1e-12 for a, b in zip(row, row[1:]))
        assert all(i.instruction.op in COMPUTE_OPS for i in row)
        assert sum(i.end - i.start for i in row) == pytest.approx(busy)
    mean_idle = sum(result.makespan - b for b in result.busy_time) / len(result.busy_time)
    assert result.bubble_ratio == pytest.approx(mean_idle / result.makespan)


@pytest.mark.parametrize("name", SCHEDULES)
def test_critical_path_spans_the_step(name: str) -> None:
    """Without latency the compute on the critical path adds up to the makespan."""
    plan = RecomputePlan.full(4)
    schedule = build_all(name, 4, 8, plan)
    result = simulate(schedule, REFERENCE, plan)
    path = parse_schedule(" ".join(result.critical_path))
    assert str(path[0]) == "0L0" and str(path[-1]) == "0OPT"
    on_path = set(result.critical_path)
    work = sum(i.end - i.start for row in result.busy for i in row if str(i.instruction) in on_path)
    assert work == pytest.approx(result.makespan)


def test_simulate_refuses_a_deadlocking_schedule() -> None:
    schedule = [
        parse_schedule("0L0 0F0 0RG0 0SA0 0B0 0TIE 0DP 0OPT"),
        parse_schedule("1L0 1RA0 1F0 1B0 1SG0 1TIE 1DP 1OPT"),
    ]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(schedule)


# --- the schedules' claims --------------------------------------------------------------


def test_reference_figures_p4_m8() -> None:
    assert run("1f1b", 4, 8, REFERENCE, "full").makespan == 44
    assert run("1f1b", 4, 8, REFERENCE, "none").makespan == 33
    assert run("shifted_critical_path", 4, 8, REFERENCE, "full").makespan <= 38
    assert run("shifted_critical_path", 4, 8, REFERENCE, "stage_aware").makespan <= 35.5


@pytest.mark.parametrize("p", range(2, 9))
def test_shifted_beats_1f1b_with_full_recompute(p: int) -> None:
    for m in (p, 2 * p, 3 * p):
        shifted = run("shifted_critical_path", p, m, REFERENCE, "full")
        baseline = run("1f1b", p, m, REFERENCE, "full")
        assert shifted.makespan < baseline.makespan, (p, m)


@pytest.mark.parametrize("mode", ["full", "stage_aware", "none"])
def test_shifted_never_loses_to_1f1b(mode: str) -> None:
    for costs in (REFERENCE, Costs(1, 2, 1, 1, 0.3), Costs(2, 1, 1, 2, 1)):
        for p in (1, 2, 3, 5):
            for m in (1, 2, p, 2 * p + 1):
                shifted = run("shifted_critical_path", p, m, costs, mode)
                baseline = run("1f1b", p, m, costs, mode)
                assert shifted.makespan <= baseline.makespan + 1e-9, (costs, p, m)


@pytest.mark.parametrize("p", range(2, 9))
def test_zero_bubble_idles_a_third_of_1f1b(p: int) -> None:
    for m in (p, 2 * p, 4 * p):
        zb, baseline = run("zero_bubble", p, m), run("1f1b", p, m)
        assert idle(zb) <= idle(baseline) / 3 + 1e-9, (p, m)
        assert zb.makespan == (m + p - 1) * 3 - 2 * (p - 1)  # bubble (P-1)·F instead of (P-1)·3F


def test_virtual_stage_targets_p4_m8() -> None:
    """Issue 17's simulated targets (P=4, M=8, a chunk costs 1/v of its stage's F:B:W = 1:1:1)."""
    one_f_one_b = run("1f1b", 4, 8)
    interleaved = run("interleaved_1f1b", 4, 8)
    assert interleaved.makespan - 24 <= (one_f_one_b.makespan - 24) / 2 and interleaved.makespan <= 28.5
    zb_v = run("zb_v", 4, 8)
    assert 25.5 <= zb_v.makespan <= 26  # 25.5: busy 24 plus (P-1) half-stage forwards before rank P-1 starts
    assert max(zb_v.peak_activations) <= max(one_f_one_b.peak_activations)
    assert run("dualpipe_v", 4, 8).makespan <= 26
    assert run("zb_v", 4, 8, REFERENCE, "full").makespan <= 33  # 1F1B + recompute 44, shifted 38


@pytest.mark.parametrize("name", ["interleaved_1f1b", "zb_v", "dualpipe_v"])
def test_virtual_stages_never_lose_to_1f1b(name: str) -> None:
    """Never slower than 1F1B with the same recompute mode (interleaved: than 1F1B with full
    recompute, DESIGN.md's bound for recompute-aware schedules); the V schedules' full
    recompute form never needs more activation memory than 1F1B's."""
    for p in (2, 3, 5):
        for m in (2 * p, 3 * p):
            for mode in ("none", "full"):
                result, baseline = run(name, p, m, REFERENCE, mode), run("1f1b", p, m, REFERENCE, mode)
                bound = run("1f1b", p, m, REFERENCE, "full") if name == "interleaved_1f1b" else baseline
                assert result.makespan <= bound.makespan + 1e-9, (p, m, mode)
                if name != "interleaved_1f1b" and mode == "full":
                    assert max(result.peak_activations) <= max(baseline.peak_activations) + 1e-9, (p, m)


# --- CLI and drawing ---------------------------------------------------------------------

CLI = ["--schedule", "1f1b", "--stages", "4", "--microbatches", "8", "--costs", "1,1,1,0,0"]


def test_cli_json_contract() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "merak.runtime.pipeline.schedule", *CLI, "--json"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    data = json.loads(out)
    assert set(data) == {"makespan", "bubble_ratio", "peak_inflight", "critical_path"}
    assert data["makespan"] == 33 and data["bubble_ratio"] == pytest.approx(3 / 11)
    assert data["peak_inflight"] == [4, 3, 2, 1]
    assert data["critical_path"][0] == "0L0"


def test_cli_text_draws_the_timeline(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*CLI, "--recompute", "full"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("stage ")]
    assert len(rows) == 4 and "F0" in rows[0] and "B7" in rows[0]
    assert "bubble ratio" in out and "critical path" in out


def test_cli_reports_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--schedule", "1f1b", "--stages", "2", "--microbatches", "2", "--costs", "1,1"]) == 2
    assert "F,B,W,R,C" in capsys.readouterr().err


def test_draw_scales_to_width() -> None:
    result = run("zero_bubble", 4, 8)
    chart = draw(result, width=60)
    assert max(len(line) for line in chart.splitlines()) <= 80
    assert draw(result).count("\n") == 4  # four stages and the ruler
