"""Stages built by the partitioner reproduce the original model exactly.

Running the stages one after another in one process must give the original model's loss and
every parameter's gradient (fp32, atol 1e-6) - for real-weight models whose stages share the
model's parameters, on a batch of another shape than the traced one (graphs must not
specialize), and for meta models whose stages are materialized and initialized independently.
"""

from __future__ import annotations

import copy

import pytest
import torch

from merak.partitioner import ProxyGraph, build_stage, run_sequentially, shard, trace
from tiny_models import TINY_KINDS, tiny_model

TRACE_SHAPE = dict(batch_size=4, seq_len=8)
RUN_SHAPE = dict(batch_size=2, seq_len=6, seed=3)
ATOL = 1e-6

_graphs: dict[str, tuple] = {}


def traced(kind: str) -> tuple[torch.nn.Module, object, ProxyGraph]:
    """One trace per kind for the whole module (tracing dominates the cost of these tests)."""
    if kind not in _graphs:
        model, make_batch = tiny_model(kind)
        meta_batch = {k: v.to("meta") for k, v in make_batch(**TRACE_SHAPE).items()}
        _graphs[kind] = (model, make_batch, trace(model, meta_batch))
    return _graphs[kind]


def reference(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of an untouched copy of ``model`` (the single-process reference)."""
    ref = copy.deepcopy(model)
    loss = ref(**batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in ref.named_parameters()}


def assert_stage_contract(stages: list) -> None:
    for a, b in zip(stages, stages[1:]):
        assert a.send_outputs == b.recv_inputs
    assert stages[0].recv_inputs == () and stages[-1].send_outputs == ()
    assert [s.is_first for s in stages] == [True] + [False] * (len(stages) - 1)
    assert [s.is_last for s in stages] == [False] * (len(stages) - 1) + [True]


def check_parity(kind: str, num_stages: int, method: str = "cost", manual_cuts: list[str] | None = None) -> list:
    model, make_batch, graph = traced(kind)
    batch = make_batch(**RUN_SHAPE)
    ref_loss, ref_grads = reference(model, batch)
    plan = shard(graph, num_stages, method=method, manual_cuts=manual_cuts)
    stages = [build_stage(plan, s) for s in range(num_stages)]
    assert_stage_contract(stages)
    model.zero_grad(set_to_none=True)
    out = run_sequentially(stages, batch)
    assert {"loss", "logits"} <= set(out)
    torch.testing.assert_close(out["loss"], ref_loss, atol=ATOL, rtol=0)
    out["loss"].backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name], atol=ATOL, rtol=0, msg=name)
    return stages


@pytest.mark.parametrize("num_stages", [2, 3, 4])
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_stages_reproduce_loss_and_gradients(kind: str, num_stages: int) -> None:
    check_parity(kind, num_stages)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_one_stage_per_layer(kind: str) -> None:
    _, _, graph = traced(kind)
    stages = check_parity(kind, len(graph.layers), method="uniform")
    assert len(stages) == len(graph.layers) == 4


def test_stages_share_the_models_parameters() -> None:
    model, _, graph = traced("gpt2")
    params = {id(p) for p in model.parameters()}
    for s in range(3):
        stage = build_stage(shard(graph, 3), s)
        assert all(id(p) in params for p in stage.parameters())


def test_gpt2_tied_embedding_is_a_tie_group_on_first_and_last_stage() -> None:
    stages = check_parity("gpt2", 3)
    assert stages[0].tied_parameters == {"transformer.wte.weight": "transformer.wte.weight"}
    assert stages[1].tied_parameters == {}
    assert stages[2].tied_parameters == {"transformer.wte.weight": "lm_head.weight"}
    assert stages[0].get_parameter("transformer.wte.weight") is stages[2].get_parameter("lm_head.weight")


def test_t5_encoder_output_skips_to_the_decoder_stages() -> None:
    # Encoder on stages 0-1, one decoder block on each of stages 2 and 3: the encoder output
    # (cross-attention input of both decoder blocks) is forwarded through stage 2.
    stages = check_parity("t5", 4, "manual", ["encoder.block.1", "decoder.block.0", "decoder.block.1"])
    forwarded = set(stages[1].send_outputs) & set(stages[2].send_outputs)
    encoder_values = [n for n in forwarded if traced("t5")[2].node(n).module.startswith("encoder")]
    assert encoder_values, "the encoder's output must pass through stage 2 to reach stage 3"
    assert "encoder_last_hidden_state" in stages[-1].output_keys


def test_plain_model_skip_across_three_stages_and_non_tensor_value() -> None:
    model, make_batch, graph = traced("mlp")
    stages = check_parity("mlp", 4)
    skip = graph.compute_nodes[1].name  # tanh(inp(x)), added back after the last block
    assert [skip in s.send_outputs for s in stages] == [True, True, True, False]
    batch, received, sent = make_batch(**RUN_SHAPE), {}, []
    for stage in stages[:-1]:
        received = stage(batch, received)
        sent += received.values()
    assert any(isinstance(v, torch.Size) for v in sent)  # h.shape, behind the Python-float scale


def test_stage_parameter_names_are_the_original_names() -> None:
    model, _, graph = traced("llama")
    names = set(dict(model.named_parameters()))
    stage = build_stage(shard(graph, 2), 1)
    assert set(dict(stage.named_parameters())) <= names
    leaf_targets = {n.target for n in stage.graph.nodes if n.op == "call_module"}
    assert any(t.endswith("mlp.down_proj") for t in leaf_targets)  # Linear stays a call_module


def test_deepcopy_keeps_the_stage_contract() -> None:
    _, make_batch, graph = traced("gpt2")
    stage = build_stage(shard(graph, 2), 0)
    clone = copy.deepcopy(stage)
    assert (clone.stage_id, clone.send_outputs, clone.tied_parameters) == (0, stage.send_outputs, stage.tied_parameters)
    batch = make_batch(**RUN_SHAPE)
    for name, value in stage(batch, {}).items():
        torch.testing.assert_close(clone(batch, {})[name], value)


# ---- meta models: stages materialize only their own weights --------------------------------------

def build_meta_stages(kind: str, num_stages: int, seed: int = 7) -> tuple[list, object]:
    model, make_batch = tiny_model(kind, meta=True)
    graph = trace(model, {k: v.to("meta") for k, v in make_batch(**TRACE_SHAPE).items()})
    plan = shard(graph, num_stages)
    return [build_stage(plan, s, seed=seed) for s in range(num_stages)], make_batch


def assert_equal_to_real_model(kind: str, stages: list, make_batch, **overrides) -> None:
    """Load the stages' weights into a real model of ``kind``; both must give the same loss."""
    real, _ = tiny_model(kind, **overrides)
    state = real.state_dict()
    loaded = set()
    with torch.no_grad():
        for stage in stages:
            for name, value in stage.state_dict().items():
                state[name].copy_(value)
                loaded.add(name)
    tied_aliases = {n for group in real_tie_groups(real) for n in group}
    assert set(dict(real.named_parameters())) - loaded <= tied_aliases
    batch = make_batch(**RUN_SHAPE)
    torch.testing.assert_close(run_sequentially(stages, batch)["loss"], real(**batch)["loss"], atol=ATOL, rtol=0)


def real_tie_groups(model: torch.nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_meta_stages_equal_a_real_model_with_their_weights(kind: str) -> None:
    stages, make_batch = build_meta_stages(kind, 3)
    assert all(p.device.type == "cpu" for stage in stages for p in stage.parameters())
    assert_equal_to_real_model(kind, stages, make_batch)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "t5", "mlp"])
def test_meta_init_does_not_depend_on_the_number_of_stages(kind: str) -> None:
    values: dict[str, torch.Tensor] = {}
    for num_stages in (1, 2, 4):
        stages, _ = build_meta_stages(kind, num_stages)
        for stage in stages:
            for name, param in stage.named_parameters(remove_duplicate=False):
                if name in values:
                    assert torch.equal(values[name], param), f"{name} differs at {num_stages} stages"
                values[name] = param.detach().clone()
    other, _ = build_meta_stages(kind, 2, seed=8)
    assert any(not torch.equal(values[n], p) for s in other for n, p in s.named_parameters())
