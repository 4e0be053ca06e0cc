"""Sharding: balanced cuts at sub-layer granularity, the comparison methods, errors, reports, CLI."""

from __future__ import annotations

import json

import pytest

from merak.partitioner import CostModel, NodeCost, ProxyNode, build_stage, shard, trace
from merak.partitioner.cli import main
from tiny_models import tiny_model

_graphs: dict[tuple, object] = {}


def graph_of(kind: str, **overrides):
    key = (kind, tuple(sorted(overrides.items())))
    if key not in _graphs:
        model, make_batch = tiny_model(kind, meta=True, **overrides)
        _graphs[key] = trace(model, {k: v.to("meta") for k, v in make_batch(batch_size=2, seq_len=16).items()})
    return _graphs[key]


def test_cost_method_balances_at_least_as_well_as_layer_methods() -> None:
    graph = graph_of("gpt2")
    for stages in (2, 3, 4):
        cost = shard(graph, stages).imbalance
        assert cost <= shard(graph, stages, "uniform").imbalance + 1e-9
        assert cost <= shard(graph, stages, "parameters").imbalance + 1e-9
    assert shard(graph, 3).imbalance < 1.05 < shard(graph, 3, "uniform").imbalance


def test_cost_optimum_is_exact_for_the_cut_sequence() -> None:
    """Compare with brute force over all valid 2-cut positions of a small graph."""
    graph = graph_of("mlp", blocks=2)
    plan = shard(graph, 3, tolerance=0.0)
    seq = plan._sequence()
    best = min(
        max(seq.range_cost(0, a), seq.range_cost(a, b), seq.range_cost(b, seq.n))
        for a in range(1, seq.n) if seq.valid[a]
        for b in range(a + 1, seq.n) if seq.valid[b]
    )
    assert max(s.cost for s in plan.stages) == pytest.approx(best, rel=1e-9)


def test_cuts_may_fall_inside_a_layer() -> None:
    graph = graph_of("gpt2", n_layer=2)
    plan = shard(graph, 3)  # 2 layers, 3 balanced stages: some cut must split a layer
    split = [s for s in range(1, 3)
             if plan.stage_nodes(s)[0].layer is not None and plan.stage_nodes(s)[0].layer == plan.stage_nodes(s - 1)[-1].layer]
    assert split, plan.table()


def test_cuts_prefer_small_activation_traffic() -> None:
    graph = graph_of("gpt2")  # 4 equal layers: 2 stages can cut between blocks
    plan = shard(graph, 2)
    hidden = 2 * 16 * 32 * 4  # one (batch, seq, hidden) fp32 tensor
    assert plan.stages[0].send_bytes == hidden
    tensors = [n for n in plan.send_outputs(0) if graph.node(n).is_tensor]
    assert len(tensors) == 1


def test_pricing_links_moves_cuts_to_cheap_points() -> None:
    from merak.partitioner import FlopCostModel

    graph = graph_of("gpt2", n_layer=3)
    hidden = 2 * 16 * 32 * 4
    free = shard(graph, 4)
    priced = shard(graph, 4, cost_model=FlopCostModel(link_bytes_per_second=1e9))
    assert max(s.send_bytes for s in free.stages) > hidden  # balance alone cuts inside blocks
    assert all(s.send_bytes == hidden for s in priced.stages[:-1])
    seq = priced._sequence()
    assert priced.stages[1].cost == pytest.approx(
        seq.prefix[priced.bounds[2]] - seq.prefix[priced.bounds[1]] + seq.transfer[priced.bounds[1]] + seq.transfer[priced.bounds[2]])


def test_no_cut_separates_a_tuple_from_its_items() -> None:
    graph = graph_of("gpt2")
    for stages in range(2, 9):
        plan = shard(graph, stages)
        for s in range(stages - 1):
            assert all(graph.node(n).sendable for n in plan.send_outputs(s))


def test_uniform_gives_every_stage_the_same_number_of_layers() -> None:
    graph = graph_of("gpt2")
    plan = shard(graph, 2, "uniform")
    layers = [{n.layer for n in plan.stage_nodes(s)} - {None} for s in range(2)]
    assert layers == [{"transformer.h.0", "transformer.h.1"}, {"transformer.h.2", "transformer.h.3"}]


def test_parameters_method_balances_parameter_counts() -> None:
    graph = graph_of("llama", tie_word_embeddings=False, vocab_size=512)
    plan = shard(graph, 2, "parameters")
    params = [s.params for s in plan.stages]
    assert max(params) / sum(params) < 0.62
    assert graph.node(plan.stages[1].first_node).layer is not None  # cut at a layer start


def test_manual_cuts_by_module_name() -> None:
    graph = graph_of("gpt2")
    plan = shard(graph, 3, "manual", manual_cuts=["transformer.h.1", "transformer.h.3.mlp"])
    assert plan.stages[1].first_module.startswith("transformer.h.1")
    assert plan.stages[2].first_module.startswith("transformer.h.3.mlp")


def test_bad_manual_cut_name_suggests_close_names() -> None:
    graph = graph_of("gpt2")
    with pytest.raises(ValueError, match=r"'transformer\.h\.9'.*did you mean.*transformer\.h\."):
        shard(graph, 2, "manual", manual_cuts=["transformer.h.9"])
    with pytest.raises(ValueError, match="needs manual_cuts with 2 names"):
        shard(graph, 3, "manual", manual_cuts=["transformer.h.1"])
    with pytest.raises(ValueError, match="execution order"):
        shard(graph, 3, "manual", manual_cuts=["transformer.h.2", "transformer.h.1"])


def test_more_stages_than_cuttable_nodes() -> None:
    graph = graph_of("mlp", blocks=2)
    cuttable = sum(graph_seq_valid(graph))
    assert shard(graph, cuttable + 1).num_stages == cuttable + 1
    with pytest.raises(ValueError, match=f"only {cuttable} valid cut positions.*at most {cuttable + 1} stages"):
        shard(graph, cuttable + 2)
    with pytest.raises(ValueError, match="cannot make 3 stages from 2 layers"):
        shard(graph, 3, "uniform")
    with pytest.raises(ValueError, match="method must be one of"):
        shard(graph, 2, "random")


def graph_seq_valid(graph) -> list[bool]:
    seq = shard(graph, 1)._sequence()
    return seq.valid[1:seq.n]


class ParameterCost(CostModel):
    """A stand-in for a profiled cost model: time proportional to parameter bytes."""

    def node_cost(self, node: ProxyNode) -> NodeCost:
        return NodeCost(forward=float(node.param_bytes), backward=0.0)


def test_cost_model_is_replaceable() -> None:
    graph = graph_of("gpt2", vocab_size=2048)  # a big embedding dominates parameter bytes
    plan = shard(graph, 2, cost_model=ParameterCost())
    assert plan.cost_model.describe() == "ParameterCost"
    assert plan.stages[0].cost == pytest.approx(sum(n.param_bytes for n in plan.stage_nodes(0)))
    assert plan.bounds != shard(graph, 2).bounds


def test_table_and_json_report_every_stage() -> None:
    graph = graph_of("gpt2")
    plan = shard(graph, 3)
    data = json.loads(json.dumps(plan.to_json()))
    assert {"stages", "imbalance", "method", "seconds"} <= set(data)
    assert data["imbalance"] == pytest.approx(max(s["cost"] for s in data["stages"]) / (sum(s["cost"] for s in data["stages"]) / 3))
    for stage in data["stages"]:
        assert {"first_node", "last_node", "params", "flops", "activation_bytes", "cost"} <= set(stage)
    lines = plan.table().splitlines()
    assert "imbalance=" in lines[0] and "GFLOPs" in lines[2]
    assert [line.split()[0] for line in lines[4:7]] == ["0", "1", "2"]


def test_stage_of_every_compute_node_is_consistent_with_bounds() -> None:
    plan = shard(graph_of("bert"), 3)
    for s in range(3):
        assert {plan.stage_of(n.name) for n in plan.stage_nodes(s)} == {s}
    with pytest.raises(IndexError):
        build_stage(plan, 3)


# ---- CLI ----------------------------------------------------------------------------------------

TINY_GPT2 = ["gpt2", "n_layer=4", "n_embd=64", "n_head=4", "vocab_size=1000", "n_positions=128"]


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", *TINY_GPT2, "--stages", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "cost" and len(data["stages"]) == 2 and data["imbalance"] < 1.1
    assert data["seconds"] > 0


def test_cli_table_from_a_config_json(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32,
                                  "intermediate_size": 64, "num_attention_heads": 4, "vocab_size": 100}))
    assert main(["--config", str(config), "num_hidden_layers=4", "--stages", "2", "--method", "uniform"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM: 2 stages, method=uniform" in out
    assert "model.layers.2" in out  # stage 1 starts at the third of four layers


def test_cli_errors_are_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "gpt2", "n_layer", "--stages", "2"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["--config", "no_such_model_type", "--stages", "2"]) == 2
    assert "unknown model_type" in capsys.readouterr().err


def test_a_graph_without_compute_nodes_gets_a_clear_error() -> None:
    import torch
    from torch import nn

    from merak.partitioner import shard, trace

    class Parameterless(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * 2.0).sum()

    with pytest.raises(ValueError, match="no compute nodes"):
        shard(trace(Parameterless(), {"x": torch.randn(2, 2)}), 1)
