"""The cluster simulator: closed forms, bounds, memory fit and monotonicity (single process, fast)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from merak.planner.cluster import Cluster, Device, Link, calibrate_device, cluster_preset, parse_bytes
from merak.planner.cost import RankCostModel, tp_layer_factors
from merak.planner.memory import Precision
from merak.planner.search import SearchSpace, layouts, search
from merak.planner.simulator import StageCosts, Strategy, TracedModel, plan_step, predict, simulate_pipeline
from merak.runtime.memory.recompute_plan import RecomputePlan

GiB = 2**30
#: A device with a flat efficiency curve, no kernel floor and no host overhead: times are pure
#: FLOPs / rate and bytes / bandwidth, so bounds below hold without slack.
FLAT = Device("flat", peak_flops=1e12, hbm_bytes=64 * GiB, hbm_bytes_per_s=1e11, matmul_efficiency=1.0,
              half_efficiency_dim=0.0, memory_efficiency=1.0, kernel_floor_s=0.0, reserved_bytes=0.0)
FAST = Link(1e10, 1e-6)
SLOW = Link(1e9, 5e-6)


def cluster(nodes: int = 1, per_node: int = 4, device: Device = FLAT, intra: Link = FAST, inter: Link = SLOW) -> Cluster:
    return Cluster(device, nodes, per_node, intra, inter)


@pytest.fixture(scope="module")
def gpt2() -> TracedModel:
    # 4 blocks, hidden 64, 4 heads, sequence 64: traced once on meta for every test below.
    return TracedModel.from_config("gpt2 n_layer=4 n_embd=64 n_head=4 n_positions=64 vocab_size=128 bos_token_id=0 eos_token_id=0", seq_len=64)


# ---- closed forms -----------------------------------------------------------------------------------

@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 4), (8, 16)])
def test_1f1b_uniform_costs_match_closed_form(p: int, m: int) -> None:
    f, b = 0.3, 0.5
    costs = StageCosts((f,) * p, (b,) * p, (0.0,) * p, (0.0,) * p, (0.0,) * p)
    result = simulate_pipeline("1f1b", p, m, costs)
    assert result.makespan == pytest.approx((m + p - 1) * (f + b))
    assert result.bubble_ratio == pytest.approx((p - 1) / (m + p - 1))


def test_ring_allreduce_closed_form_inside_and_across_nodes() -> None:
    c = cluster(nodes=2, per_node=4)
    nbytes = 3e8
    inside = [0, 1, 2, 3]
    n = 4
    assert c.allreduce_seconds(nbytes, inside) == pytest.approx(
        2 * (n - 1) / n * nbytes / FAST.bytes_per_s + 2 * (n - 1) * FAST.latency_s)
    # one rank per node: one NIC's bandwidth and the inter-node latency
    across = [0, 4]
    assert c.allreduce_seconds(nbytes, across) == pytest.approx(nbytes / SLOW.bytes_per_s + 2 * SLOW.latency_s)
    # two ranks per node drive two NICs
    wide = [0, 1, 4, 5]
    assert c.allreduce_seconds(nbytes, wide) == pytest.approx(
        2 * 3 / 4 * nbytes / (2 * SLOW.bytes_per_s) + 6 * SLOW.latency_s)
    assert c.allreduce_seconds(nbytes, [3]) == 0.0
    assert c.p2p_seconds(1e6, 3, 4) == pytest.approx(SLOW.latency_s + 1e6 / SLOW.bytes_per_s)
    assert c.p2p_seconds(1e6, 2, 3) == pytest.approx(FAST.latency_s + 1e6 / FAST.bytes_per_s)


def test_gemm_efficiency_saturates_and_thin_gemms_are_slower_per_flop() -> None:
    d = cluster_preset("a100-80gb").device
    effs = [d.gemm_efficiency(4096, n, 4096) for n in (64, 256, 1024, 8192)]
    assert effs == sorted(effs) and effs[-1] < d.matmul_efficiency
    assert d.gemm_efficiency(4096, 8192, 4096) > 0.95 * d.matmul_efficiency
    flops = 2 * 4096 * 4096 * 4096
    assert d.matmul_seconds(flops, 4096, 4096, 4096) > flops / d.peak_flops


# ---- tensor parallelism ---------------------------------------------------------------------------

def test_tp_overlap_is_bounded(gpt2: TracedModel) -> None:
    c = cluster(per_node=4)
    tp = 2
    base = RankCostModel(FLAT, batch_scale=8, byte_scale=0.5, tp=tp, tp_plan=gpt2.tp_plan(tp))
    f1, b1 = tp_layer_factors(gpt2.graph, base, 1, c.intra)
    # k = 1: every all-reduce is exposed, so the layer takes compute + all its collectives
    layer = gpt2.graph.layers[len(gpt2.graph.layers) // 2]
    nodes = [n for n in gpt2.graph.compute_nodes if n.layer == layer]
    compute = sum(base.forward_seconds(n) for n in nodes)
    rows = [n for n in nodes if n.op == "call_module" and gpt2.tp_plan(tp).style(n.target) == "row"]
    assert len(rows) == 2  # attention output and MLP down projection
    comm = sum(2 * (tp - 1) * c.intra.latency_s + (tp - 1) / tp * 2 * n.output_bytes * 8 * 0.5 / c.intra.bytes_per_s
               for n in rows)
    assert f1 == pytest.approx((compute + comm) / compute, rel=1e-6)
    assert b1 > 1.0
    for k in (2, 4):
        fk, bk = tp_layer_factors(gpt2.graph, base, k, c.intra)
        assert fk >= 1.0 and bk >= 1.0  # nothing is faster than its compute alone
        assert fk * compute >= comm  # nor than its communication stream
    # with communication comparable to compute, splitting hides some of it
    slow = dataclasses.replace(c.intra, bytes_per_s=2e9)
    f1_slow, _ = tp_layer_factors(gpt2.graph, base, 1, slow)
    f2_slow, _ = tp_layer_factors(gpt2.graph, base, 2, slow)
    assert f2_slow < f1_slow


# ---- memory ------------------------------------------------------------------------------------------

def test_layout_over_memory_is_flagged_and_refused(gpt2: TracedModel) -> None:
    small = dataclasses.replace(FLAT, hbm_bytes=3e6)
    c = cluster(per_node=2, device=small)
    strategy = Strategy(dp=1, tp=1, pp=2, micro_batch=4, schedule="1f1b", recompute="none")
    p = predict(gpt2, strategy, 32, c)
    assert not p.fits and p.peak_memory_bytes > small.usable_bytes
    space = SearchSpace(schedules=("1f1b",), recomputes=("none",), micro_batches=(4,), tp_degrees=(1,))
    result = search(gpt2, c, 32, space)
    assert result.best == () and result.refused_memory + result.pruned == result.candidates and result.refused_memory > 0


@pytest.mark.parametrize("schedule,mode", [("1f1b", "none"), ("1f1b", "full"), ("zero_bubble", "none"),
                                           ("shifted_critical_path", "full")])
def test_memory_agrees_with_the_runtime_estimator(gpt2: TracedModel, schedule: str, mode: str) -> None:
    from merak.runtime.memory.policy import ActivationPlan
    from merak.runtime.memory.estimator import Layout, estimate_memory

    s = Strategy(pp=4, micro_batch=1, schedule=schedule, recompute=mode, precision=Precision(4, 4, 8, 4))
    sp = plan_step(gpt2, s, 8, cluster(per_node=4))
    layout = Layout(pp=4, micro_batch_size=1, num_microbatches=8, schedule=schedule, precision="fp32")
    theirs = estimate_memory(sp.partition, layout, ActivationPlan.from_mode(mode, sp.partition))
    for ours, ref in zip(sp.memory, theirs):
        assert ours.activation_bytes == pytest.approx(ref.activation_bytes, rel=0.1)
        assert ours.workspace_bytes == pytest.approx(ref.workspace_bytes, rel=0.01)
        assert ours.params_bytes + ours.grads_bytes + ours.optimizer_bytes == pytest.approx(ref.static_bytes, rel=0.01)


def test_stage_aware_recomputes_only_what_the_budget_needs(gpt2: TracedModel) -> None:
    strategy = Strategy(dp=1, tp=1, pp=4, micro_batch=8, schedule="shifted_critical_path", recompute="none")
    roomy = cluster(per_node=4)
    none = plan_step(gpt2, strategy, 64, roomy)
    full = plan_step(gpt2, dataclasses.replace(strategy, recompute="full"), 64, roomy)
    peak_none = max(m.total_bytes for m in none.memory)
    peak_full = max(m.total_bytes for m in full.memory)
    assert peak_full < peak_none
    budget = (peak_none + peak_full) / 2
    tight = cluster(per_node=4, device=dataclasses.replace(FLAT, hbm_bytes=budget))
    aware = plan_step(gpt2, dataclasses.replace(strategy, recompute="stage_aware"), 64, tight)
    assert aware.fits
    fractions = aware.recompute_plan.fractions
    assert fractions[0] > 0.0 and fractions[-1] == 0.0  # the budget forces some, not all, recomputation
    assert list(fractions) == sorted(fractions, reverse=True)  # early stages hold more micro-batches
    # on a device that holds everything, stage-aware recomputes nothing
    assert plan_step(gpt2, dataclasses.replace(strategy, recompute="stage_aware"), 64, roomy).recompute_plan.fractions \
        == (0.0,) * 4


def test_search_never_returns_a_layout_over_budget(gpt2: TracedModel) -> None:
    none = plan_step(gpt2, Strategy(pp=4, micro_batch=4, recompute="none"), 64, cluster(per_node=4))
    budget = 0.8 * max(m.total_bytes for m in none.memory)
    c = cluster(per_node=4, device=dataclasses.replace(FLAT, hbm_bytes=budget))
    result = search(gpt2, c, 64, SearchSpace(micro_batches=(2, 4), tp_sub_microbatches=(1,)))
    assert result.best
    for p in result.best:
        assert p.peak_memory_bytes <= budget
    assert [p.step_seconds for p in result.best] == sorted(p.step_seconds for p in result.best)


# ---- predictions -------------------------------------------------------------------------------------

def test_pipeline_time_between_busy_bound_and_1f1b_bound(gpt2: TracedModel) -> None:
    c = cluster(per_node=4)
    s = Strategy(pp=4, micro_batch=2, schedule="1f1b")
    sp = plan_step(gpt2, s, 16, c)
    p = predict(gpt2, s, 16, c, sp)
    costs, m = sp.costs, sp.microbatches
    slowest = max(f + b + w for f, b, w in zip(costs.forward, costs.backward_input, costs.backward_weight))
    assert p.pipeline_seconds >= sp.busy_lower_bound
    assert p.pipeline_seconds <= (m + 3) * slowest + 2 * 3 * max(costs.p2p) + 1e-12
    assert p.step_seconds >= p.pipeline_seconds
    assert 0 < p.mfu < 1


def test_more_data_parallel_devices_take_less_time_per_sample(gpt2: TracedModel) -> None:
    times = []
    for dp in (1, 2, 4):
        c = cluster(per_node=dp)
        p = predict(gpt2, Strategy(dp=dp, micro_batch=2), 32, c)
        times.append(p.step_seconds / 32)
    assert times[0] > times[1] > times[2]


def test_faster_links_and_more_microbatches_never_hurt(gpt2: TracedModel) -> None:
    s = Strategy(dp=2, pp=4, micro_batch=2, schedule="1f1b")
    slow = predict(gpt2, s, 32, cluster(nodes=2, per_node=4, intra=SLOW, inter=Link(1e8, 1e-5)))
    fast = predict(gpt2, s, 32, cluster(nodes=2, per_node=4))
    assert fast.step_seconds <= slow.step_seconds
    bubbles = [predict(gpt2, Strategy(pp=4, micro_batch=2), gb, cluster(per_node=4)).bubble_ratio for gb in (8, 16, 64)]
    assert bubbles[0] > bubbles[1] > bubbles[2]


def test_recomputation_costs_time_and_saves_memory(gpt2: TracedModel) -> None:
    c = cluster(per_node=4)
    base = Strategy(pp=4, micro_batch=4, schedule="1f1b")
    none, full = (predict(gpt2, dataclasses.replace(base, recompute=r), 32, c) for r in ("none", "full"))
    assert full.step_seconds > none.step_seconds
    assert full.peak_memory_bytes < none.peak_memory_bytes
    shifted = predict(gpt2, dataclasses.replace(base, schedule="shifted_critical_path", recompute="full"), 32, c)
    assert shifted.step_seconds < full.step_seconds  # Merak's schedule takes recomputation off the path


def test_virtual_stage_schedules_in_the_cluster_simulator(gpt2: TracedModel) -> None:
    """zb_v and interleaved_1f1b plan and predict (a chunk costs 1/v of its rank's stage): faster
    than 1F1B on the same layout; zb_v's memory estimate holds P micro-batches on every rank;
    sizes a schedule refuses are refused with its reason."""
    c = cluster(per_node=4)
    base = Strategy(pp=4, micro_batch=2, schedule="1f1b")
    one_f_one_b = predict(gpt2, base, 16, c)
    for name in ("zb_v", "interleaved_1f1b"):
        p = predict(gpt2, dataclasses.replace(base, schedule=name), 16, c)
        assert p.pipeline_seconds < one_f_one_b.pipeline_seconds, name
    zb_v = plan_step(gpt2, dataclasses.replace(base, schedule="zb_v"), 16, c)
    assert [round(float(h.sum(axis=1).max()), 9) for h in _holders(zb_v)] == [4.0] * 4
    with pytest.raises(ValueError, match="multiple of the pipeline stages"):
        predict(gpt2, dataclasses.replace(base, schedule="interleaved_1f1b"), 10, c)
    with pytest.raises(ValueError, match="at least 2P"):
        predict(gpt2, dataclasses.replace(base, schedule="dualpipe_v"), 12, c)


def _holders(sp):  # the in-flight micro-batch counts the memory model charged, per rank
    from merak.planner.memory import holder_profile

    return [holder_profile(ops, num_chunks=sp.schedule.placement.num_chunks) for ops in sp.schedule]


def test_strategy_errors_name_the_fix(gpt2: TracedModel) -> None:
    c = cluster(per_node=4)
    with pytest.raises(ValueError, match="product is 4"):
        predict(gpt2, Strategy(dp=2, pp=1), 8, c)
    with pytest.raises(ValueError, match="must divide the micro-batch"):
        predict(gpt2, Strategy(tp=2, pp=2, micro_batch=3, tp_sub_microbatches=2), 6, c)
    with pytest.raises(ValueError, match="tp <= 4"):
        predict(gpt2, Strategy(tp=8), 8, cluster(nodes=2, per_node=4))


def test_layouts_and_parse_bytes() -> None:
    got = layouts(8, 4, [1, 2, 4, 8], max_pp=4)
    assert (8, 1, 1) in got and (1, 4, 2) in got and all(tp <= 4 and pp <= 4 and dp * tp * pp == 8 for dp, tp, pp in got)
    assert parse_bytes("80GB") == 80 * GiB and parse_bytes("512MB") == 512 * 2**20 and parse_bytes(1e3) == 1e3
    with pytest.raises(ValueError, match="80GB"):
        parse_bytes("lots")


def test_calibration_fits_this_cpu() -> None:
    cal = calibrate_device(sizes=(64, 128, 256), repeats=3)
    dev = cal.device
    assert dev.peak_flops > 1e8 and dev.hbm_bytes_per_s > 1e8 and dev.op_overhead_s > 0
    assert {c for c, _, _ in dev.op_rates} == {"arith", "transcendental", "softmax", "norm", "dropout"}
    assert dev.matmul_backward_factor >= 1.0 and math.isfinite(dev.half_efficiency_dim)
    # the fitted curve reproduces the largest measured linear layer within a factor of 2
    size, seconds = cal.gemm[-1]
    predicted = dev.matmul_seconds(2 * cal.rows * size * size, cal.rows, size, size)
    assert 0.5 < predicted / seconds < 2.0


def test_precision_scales_memory(gpt2: TracedModel) -> None:
    c = cluster(per_node=2)
    s = Strategy(pp=2, micro_batch=2)
    fp32 = plan_step(gpt2, dataclasses.replace(s, precision=Precision(4, 4, 8, 4)), 8, c)
    pure16 = plan_step(gpt2, dataclasses.replace(s, precision=Precision(2, 2, 12, 2, autocast=False)), 8, c)
    autocast = plan_step(gpt2, s, 8, c)
    # a model run in 16 bits saves half of what fp32 saves; autocast over fp32 weights saves more
    assert fp32.memory[0].activation_bytes == pytest.approx(2 * pure16.memory[0].activation_bytes)
    assert autocast.memory[0].activation_bytes > pure16.memory[0].activation_bytes
    assert fp32.memory[0].params_bytes == autocast.memory[0].params_bytes == 2 * pure16.memory[0].params_bytes
    assert RecomputePlan.none(2) == autocast.recompute_plan
