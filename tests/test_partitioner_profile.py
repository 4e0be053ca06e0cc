"""Profiled cost model: node times measured on the device drive the cuts where FLOPs mislead."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from merak.partitioner import build_stage, init_empty_weights, shard, trace
from merak.partitioner.profiler import ProfiledCostModel, profile_costs
from tiny_models import tiny_model


class SlowNorm(nn.Module):
    """A cheap op by FLOPs that takes a long time (like a memory-bound op on a slow device)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x * 1.0


class Chain(nn.Module):
    """Six equal Linear layers, then one FLOP-free op that costs as much time as four of them."""

    def __init__(self, width: int = 64, slow_seconds: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(6))
        self.slow = SlowNorm(slow_seconds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.slow(x).sum()


def _chain_graph(slow_seconds: float):
    model = Chain(slow_seconds=slow_seconds)
    x = torch.randn(32, 64)
    return model, trace(model, {"x": x}, leaf_modules=[SlowNorm]), {"x": x}


def test_profile_moves_the_cut_toward_a_slow_op_that_flops_ignore() -> None:
    model, graph, inputs = _chain_graph(slow_seconds=0.02)
    by_flops = shard(graph, 2)
    profiled = profile_costs(graph, inputs, repeats=3)
    by_time = shard(graph, 2, cost_model=profiled)
    slow_stage_layers = lambda plan: sum(1 for n in plan.stage_nodes(1) if n.target.startswith("layers."))  # noqa: E731
    # FLOPs see six equal layers and a free op: three layers on each side.
    assert slow_stage_layers(by_flops) == 3, by_flops.table()
    # Measured, the slow op alone outweighs several layers, so the last stage gets fewer of them.
    assert slow_stage_layers(by_time) < 3, by_time.table()
    assert profiled.node_cost(graph.node("slow")).forward >= 0.02
    assert "ProfiledCostModel" in by_time.table()


def test_profile_measures_forward_and_backward_of_every_compute_node() -> None:
    model, make_batch = tiny_model("gpt2")
    # Big enough that a matmul's backward clearly exceeds the subtracted launch overhead even on a
    # busy machine (at batch 2 x 16 tokens the two are within timer noise of each other).
    batch = make_batch(batch_size=8, seq_len=64)
    graph = trace(model, batch)
    profiled = profile_costs(graph, batch, repeats=2)
    compute = [n for n in graph.compute_nodes]
    assert {n.name for n in compute} <= set(profiled.times)
    for node in compute:
        cost = profiled.node_cost(node)
        assert cost.forward > 0.0, node.name
        if not node.requires_grad:
            assert cost.backward == 0.0, node.name  # autograd never visits it
    # The matmuls' backward (input and weight gradients) is well above the launch overhead that
    # is subtracted (tiny norms' backward may round to zero on a tiny model).
    matmuls = sorted((n for n in compute if n.params and n.requires_grad), key=lambda n: n.flops)[-4:]
    assert all(profiled.node_cost(n).backward > 0.0 for n in matmuls), [profiled.node_cost(n) for n in matmuls]
    assert all(p.grad is None for p in model.parameters())  # profiling leaves no gradients behind
    # The plan built from measured costs still reproduces the model (same graph, other cuts).
    plan = shard(graph, 2, cost_model=profiled)
    s0, s1 = build_stage(plan, 0), build_stage(plan, 1)
    out0 = s0(batch, {})
    loss = s1(batch, {k: out0[k] for k in s1.recv_inputs})["loss"]
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-6, atol=1e-6)


def test_profile_runs_a_meta_model_without_materializing_it() -> None:
    with init_empty_weights():
        model, make_batch = tiny_model("llama")
    batch = make_batch(batch_size=2, seq_len=8)
    graph = trace(model, {k: v.to("meta") for k, v in batch.items()})
    profiled = profile_costs(graph, batch, repeats=1)
    assert profiled.total.forward > 0.0
    assert all(p.device.type == "meta" for p in model.parameters())


def test_profile_refuses_meta_example_inputs() -> None:
    _, graph, inputs = _chain_graph(slow_seconds=0.0)
    with pytest.raises(ValueError, match="real example inputs"):
        profile_costs(graph, {"x": inputs["x"].to("meta")})


def _average_on_ranks() -> dict[str, float]:
    import torch.distributed as dist

    import merak
    from merak.partitioner import NodeCost

    merak.init(dp=2)
    rank = dist.get_rank()
    local = ProfiledCostModel(times={"a": NodeCost(1.0 + rank, 2.0 * (1 + rank)), "b": NodeCost(rank, 0.0)})
    mean = local.averaged(timeout_s=30)
    return {name: (c.forward, c.backward) for name, c in mean.times.items()}


def test_profiles_are_averaged_so_every_rank_cuts_alike(dist_run) -> None:
    results = dist_run(_average_on_ranks, 2)
    assert results[0] == results[1] == {"a": (1.5, 3.0), "b": (0.5, 0.0)}


def test_trainer_partitions_by_profiled_costs_and_keeps_the_loss_curve(dist_run) -> None:
    from test_trainer import _train, single_process_curve

    curves = dist_run(_train, 2, "gpt2", 1, 2, partition_cost_model="profile", timeout=600)
    for curve in curves:
        torch.testing.assert_close(curve, single_process_curve("gpt2"), rtol=2e-5, atol=2e-6)
