"""Stage-level calibration: the stages a plan produces are timed whole and the cut corrected."""

from __future__ import annotations

import pytest
import torch

from merak.partitioner import NodeCost, init_empty_weights, shard, trace
from merak.partitioner.calibration import CalibratedCostModel, calibrate, time_stages
from test_partitioner_profile import _chain_graph
from tiny_models import tiny_model


def _layers_in_last_stage(plan) -> int:
    return sum(1 for n in plan.stage_nodes(plan.num_stages - 1) if n.target.startswith("layers."))


def test_calibration_moves_the_cut_away_from_a_stage_measured_slow() -> None:
    """FLOPs call the sleeping op free and split the six layers 3/3; timing the stages shows the
    last one is far slower, so calibration gives it fewer layers, and it keeps a measured-better plan."""
    model, graph, inputs = _chain_graph(slow_seconds=0.01)
    by_flops = shard(graph, 2)
    assert _layers_in_last_stage(by_flops) == 3, by_flops.table()
    calibration = calibrate(by_flops, inputs, rounds=2, repeats=2)
    assert _layers_in_last_stage(calibration.plan) < 3, calibration.table()
    first, kept = calibration.rounds[0], calibration.rounds[calibration.chosen]
    assert first.measured[1].forward >= 0.01  # the sleep is inside the last stage's forward
    assert kept.imbalance <= first.imbalance and calibration.speedup >= 1.0
    assert isinstance(calibration.plan.cost_model, CalibratedCostModel)
    assert "calibrated by" in calibration.plan.table() and "kept round" in calibration.table()
    assert all(p.grad is None for p in model.parameters())


def test_time_stages_feeds_each_stage_its_predecessor_outputs() -> None:
    model, make_batch = tiny_model("gpt2")
    batch = make_batch(batch_size=2, seq_len=16)
    plan = shard(trace(model, batch), 3)
    times = time_stages(plan, batch, repeats=2)
    assert len(times) == 3 and all(t.forward > 0 and t.backward > 0 for t in times), times
    assert all(p.grad is None for p in model.parameters())


def test_time_stages_materializes_a_meta_model_one_stage_at_a_time() -> None:
    with init_empty_weights():
        model, make_batch = tiny_model("llama")
    batch = make_batch(batch_size=2, seq_len=8)
    plan = shard(trace(model, {k: v.to("meta") for k, v in batch.items()}), 2)
    times = time_stages(plan, batch, repeats=1)
    assert len(times) == 2 and all(t.total > 0 for t in times)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_corrected_costs_predict_the_measured_stage_times() -> None:
    _, graph, _ = _chain_graph(slow_seconds=0.0)
    plan = shard(graph, 2)
    base = CalibratedCostModel(plan.cost_model, {}, {})
    measured = [NodeCost(2.0, 4.0), NodeCost(1.0, 0.5)]
    corrected = base.corrected(plan, measured)
    for s, want in enumerate(measured):
        got = [corrected.node_cost(n) for n in plan.stage_nodes(s)]
        assert sum(c.forward for c in got) == pytest.approx(want.forward)
        assert sum(c.backward for c in got) == pytest.approx(want.backward)
    assert corrected.rounds == 1


def test_calibration_refuses_plans_that_are_not_cost_based() -> None:
    _, graph, inputs = _chain_graph(slow_seconds=0.0)
    with pytest.raises(ValueError, match="method='uniform'"):
        calibrate(shard(graph, 2, method="uniform"), inputs)


def _calibrate_on_ranks() -> tuple[tuple[int, ...], list[tuple[float, float]]]:
    import torch.distributed as dist

    import merak

    merak.init(dp=2)
    model, graph, inputs = _chain_graph(slow_seconds=0.002 * (1 + dist.get_rank()))  # ranks measure differently
    calibration = calibrate(shard(graph, 2), inputs, rounds=2, repeats=2, timeout_s=60)
    return calibration.plan.bounds, [(c.forward, c.backward) for r in calibration.rounds for c in r.measured]


def test_every_rank_keeps_the_same_calibrated_cut(dist_run) -> None:
    first, second = dist_run(_calibrate_on_ranks, 2)
    assert first == second  # averaged measurements: one decision


def test_trainer_calibrates_the_partition_and_keeps_the_loss_curve(dist_run) -> None:
    from test_trainer import _train, single_process_curve

    curves = dist_run(_train, 2, "gpt2", 1, 2, partition_calibration_rounds=1, timeout=600)
    for curve in curves:
        torch.testing.assert_close(curve, single_process_curve("gpt2"), rtol=2e-5, atol=2e-6)


def test_arguments_reject_calibrating_a_fixed_cut() -> None:
    from merak import MerakArguments

    with pytest.raises(ValueError, match="partition_method='cost'"):
        MerakArguments(output_dir="/tmp/unused", partition_method="uniform", partition_calibration_rounds=1)
    with pytest.raises(ValueError, match=">= 0"):
        MerakArguments(output_dir="/tmp/unused", partition_calibration_rounds=-1)


def _pipeline_times(schedule: str = "1f1b") -> dict[str, object]:
    import merak
    from merak.partitioner import trace
    from merak.runtime.pipeline.calibration import calibrate_in_pipeline, pipeline_stage_times
    from merak.runtime.pipeline.schedule import placement_for

    grid = merak.init(pp=2)
    torch.manual_seed(0)
    model, make_batch = tiny_model("gpt2")
    batch = make_batch(batch_size=2, seq_len=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = shard(trace(model, batch), placement_for(schedule, 2).num_virtual)
    rng = torch.get_rng_state()
    times = pipeline_stage_times(plan, grid, [batch] * 4, steps=1, timeout_s=60, schedule=schedule)
    unchanged = torch.equal(rng, torch.get_rng_state()) and all(
        torch.equal(before[n], p) and p.grad is None for n, p in model.named_parameters())
    calibration = calibrate_in_pipeline(plan, grid, [batch] * 4, rounds=1, steps=1, timeout_s=60, schedule=schedule)
    return {"times": [(t.forward, t.backward) for t in times], "unchanged": unchanged,
            "bounds": calibration.plan.bounds, "rounds": len(calibration.rounds)}


@pytest.mark.parametrize("schedule, stages", [("1f1b", 2), ("zb_v", 4)])
def test_pipeline_stage_times_are_measured_in_dry_steps_every_rank_agrees_on(dist_run, schedule, stages) -> None:
    """Each rank times its own stage in dry 1F1B steps (under zb_v: each of its two chunks, in
    dry zb_v steps); all ranks learn every stage's times and keep the same calibrated cut; the
    dry steps leave weights, gradients and RNG untouched."""
    first, second = dist_run(_pipeline_times, 2, schedule, timeout=300)
    assert first["times"] == second["times"] and first["bounds"] == second["bounds"]
    assert len(first["times"]) == stages and all(f > 0 and b > 0 for f, b in first["times"])
    assert first["unchanged"] and second["unchanged"]
    assert 1 <= first["rounds"] <= 2
