"""Tracing on meta and the costed proxy graph: paths taken, costs recorded, errors raised."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from merak.partitioner import TraceError, TensorMeta, build_stage, run_sequentially, shard, trace
from merak.partitioner.proxy_graph import COMPUTE, REPLICATED
from test_partitioner_equivalence import assert_equal_to_real_model
from tiny_models import tiny_model


def meta_batch(make_batch, **shape) -> dict[str, torch.Tensor]:
    return {k: v.to("meta") for k, v in make_batch(**shape).items()}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "t5", "vit"])
def test_hf_models_take_the_fx_path_without_specializing_shapes(kind: str) -> None:
    model, make_batch = tiny_model(kind, meta=True)
    graph = trace(model, meta_batch(make_batch, batch_size=4, seq_len=8))
    assert graph.flavour == "fx" and graph.dynamic
    assert not [n for n in graph.notes if "specialized" in n], graph.notes
    leaves = {type(model.get_submodule(n.target)).__name__ for n in graph.graph.nodes if n.op == "call_module"}
    assert leaves & {"Linear", "Conv1D"} and "Embedding" in leaves or kind == "vit"


def test_sdpa_attention_traces_too() -> None:
    model, make_batch = tiny_model("llama", attn_implementation="sdpa")
    graph = trace(model, make_batch(batch_size=4, seq_len=8))
    batch = make_batch(batch_size=2, seq_len=5, seed=1)
    out = run_sequentially([build_stage(shard(graph, 2), s) for s in range(2)], batch)
    torch.testing.assert_close(out["loss"], model(**batch).loss, atol=1e-6, rtol=0)


def test_tracing_a_real_model_copies_no_weights() -> None:
    model, make_batch = tiny_model("gpt2")
    before = {n: (p.data_ptr(), p.device) for n, p in model.named_parameters()}
    graph = trace(model, make_batch())
    assert graph.model is model
    assert {n: (p.data_ptr(), p.device) for n, p in model.named_parameters()} == before
    assert not any(name.startswith("_merak") or name.startswith("_tensor_constant") for name, _ in model.named_buffers())


def test_every_node_carries_costs_and_tensor_metadata() -> None:
    model, make_batch = tiny_model("mlp", hidden=32)
    graph = trace(model, make_batch(batch_size=4, seq_len=8))
    inp = graph.node("inp")
    assert inp.flops == 2 * 4 * 8 * 32 * 32  # FlopCounterMode's count of a (4*8, 32) x (32, 32) matmul
    assert inp.meta == TensorMeta((4, 8, 32), torch.float32, True)
    assert inp.output_bytes == 4 * 8 * 32 * 4
    assert inp.param_bytes == (32 * 32 + 32) * 4 and inp.params == ("inp.weight", "inp.bias")
    assert all(n.meta is not None for n in graph.nodes if n.role != "output")
    assert graph.total_flops == sum(n.flops for n in graph.nodes) > 0


def test_backward_is_modelled_only_where_autograd_runs() -> None:
    from merak.partitioner import FlopCostModel

    model, make_batch = tiny_model("gpt2")
    graph = trace(model, make_batch(batch_size=2, seq_len=8))
    cost = FlopCostModel()
    matmul = graph.node("transformer_h_0_attn_c_attn")
    assert cost.node_cost(matmul).backward == pytest.approx(2 * cost.node_cost(matmul).forward)
    masks = [n for n in graph.nodes if n.role == REPLICATED]
    assert masks and all(cost.node_cost(n).backward == 0 for n in masks)


def test_masks_and_sizes_are_recomputed_per_stage_not_sent() -> None:
    model, make_batch = tiny_model("llama")
    graph = trace(model, make_batch(batch_size=2, seq_len=8))
    plan = shard(graph, 4)
    mask_shape = (2, 1, 8, 8)
    masks = [n for n in graph.nodes if n.is_tensor and n.meta.shape == mask_shape]
    assert masks and all(n.role == REPLICATED for n in masks)
    for s in range(4):
        sent = [graph.node(n) for n in plan.send_outputs(s)]
        assert not [n.name for n in sent if n.role != COMPUTE or (n.is_tensor and n.meta.shape == mask_shape)]
    assert all("attention_mask" in build_stage(plan, s).data_inputs for s in range(4))


class NeedsTensor(nn.Module):
    """fx cannot trace this (a proxy is not a Tensor); torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError("x must be a tensor")
        logits = self.b(torch.relu(self.a(x)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_untraceable_by_fx_falls_back_to_torch_export() -> None:
    model = NeedsTensor()
    batch = {"x": torch.randn(4, 8), "labels": torch.tensor([0, 1, 2, 0])}
    graph = trace(model, batch)
    assert graph.flavour == "export" and "fx tracing failed" in graph.notes[0]
    small = {"x": torch.randn(2, 8), "labels": torch.tensor([2, 1])}
    out = run_sequentially([build_stage(shard(graph, 2), s) for s in range(2)], small)
    torch.testing.assert_close(out["loss"], model(**small)["loss"], atol=1e-6, rtol=0)


def test_forced_export_flavour_on_a_meta_hf_model() -> None:
    model, make_batch = tiny_model("gpt2", meta=True, n_layer=2)
    graph = trace(model, meta_batch(make_batch, batch_size=4, seq_len=8), flavour="export")
    assert graph.flavour == "export"
    plan = shard(graph, 2)
    stages = [build_stage(plan, s) for s in range(2)]
    assert stages[0].tied_parameters and stages[1].tied_parameters  # wte / lm_head held by both
    assert_equal_to_real_model("gpt2", stages, make_batch, n_layer=2)


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: unknowable on meta, impossible to export
            return self.lin(x) * 2
        return self.lin(x)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.gate = Gate()
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.gate(torch.relu(self.a(x)))).sum()


def test_untraceable_model_error_names_the_module_and_the_fix() -> None:
    with pytest.raises(TraceError) as err:
        trace(Gated(), {"x": torch.randn(4, 8)})
    message = str(err.value)
    assert "in module gate (Gate)" in message and "data-dependent" in message
    assert "leaf_modules=('Gate',)" in message and "torch.export" in message


def test_leaf_module_makes_it_traceable() -> None:
    model = Gated()
    graph = trace(model, {"x": torch.randn(4, 8)}, leaf_modules=("Gate",))
    assert [n.name for n in graph.compute_nodes] == ["a", "relu", "gate", "b", "sum_1"]
    x = torch.randn(3, 8)
    out = run_sequentially([build_stage(shard(graph, 2), s) for s in range(2)], {"x": x})
    assert torch.equal(out["output"], model(x))


class CastsItsBuffer(nn.Module):
    """CTRL's pattern: ``forward`` re-assigns a buffer cast to the input's device and dtype, and
    scales by a NumPy scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.table = nn.Buffer(torch.randn(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        self.table = self.table.to(device=x.device, dtype=x.dtype)
        return (self.proj(x) * np.sqrt(8.0) + self.table[: x.shape[0]]).sum()


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.running = nn.Buffer(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.running = 0.9 * self.running + 0.1 * x.mean(0)  # a statistic carried to the next step
        return x + self.running


class CountsInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.stats = Counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stats(self.proj(x)).sum()


def test_a_buffer_cast_in_forward_traces_and_leaves_the_model_untouched() -> None:
    model = CastsItsBuffer()
    table = model.table
    graph = trace(model, {"x": torch.randn(4, 8)})
    assert model.table is table and [n for n, _ in model.named_buffers()] == ["table"]
    assert any("ignored a cast of table" in note for note in graph.traced.notes)
    x = torch.randn(4, 8)
    out = run_sequentially([build_stage(shard(graph, 1), 0)], {"x": x})
    torch.testing.assert_close(out["output"], model(x))


def test_state_carried_across_steps_is_refused_naming_the_attribute_and_leaf_fix() -> None:
    model = CountsInForward()
    running = model.stats.running
    with pytest.raises(TraceError) as err:  # fx refuses, and torch.export (the fallback) alike
        trace(model, {"x": torch.randn(4, 8)})
    assert "stats.running (Counter)" in str(err.value) and "leaf_modules=('stats',)" in str(err.value)
    assert "forward updates module state stats.running" in str(err.value)
    assert model.stats.running is running  # the failed trace left the model as it was
    graph = trace(model, {"x": torch.randn(4, 8)}, leaf_modules=("stats",))
    reference = copy.deepcopy(model)
    stage = build_stage(shard(graph, 1), 0)
    for x in torch.randn(2, 4, 8):  # the leaf runs its real forward: the statistic carries over steps
        torch.testing.assert_close(run_sequentially([stage], {"x": x})["output"], reference(x))


class RefinesWithoutGrad(nn.Module):
    """HRM's pattern: all but the last refinement step run under ``torch.no_grad()``."""

    def __init__(self) -> None:
        super().__init__()
        self.step = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(3):
            with torch.no_grad() if i < 2 else contextlib.nullcontext():
                h = torch.tanh(self.step(h) + x)
        return h.pow(2).sum()


def test_no_grad_regions_in_forward_keep_their_gradients() -> None:
    model = RefinesWithoutGrad()
    graph = trace(model, {"x": torch.randn(4, 8)})
    stages = [build_stage(shard(graph, 2), s) for s in range(2)]
    x = torch.randn(4, 8, requires_grad=True)
    run_sequentially(stages, {"x": x})["output"].backward()
    got = {n: p.grad for s in stages for n, p in s.named_parameters()}
    model(x.detach().requires_grad_()).backward()
    assert got.keys() == {"step.weight", "step.bias"}
    for name, param in model.named_parameters():  # only the last step's use of the weights counts
        torch.testing.assert_close(got[name], param.grad)


def test_a_trace_that_fails_half_way_leaves_grad_mode_as_it_was(monkeypatch) -> None:
    import merak.partitioner.proxy_graph as proxy_graph

    def fails_with_grad_off(traced):  # what torch.export's wrap_with_set_grad_enabled did on a failing node
        torch._C._set_grad_enabled(False)
        raise TraceError("cannot cost node")

    monkeypatch.setattr(proxy_graph, "annotate", fails_with_grad_off)
    model, make_batch = tiny_model("mlp")
    with pytest.raises(TraceError):
        trace(model, make_batch())
    assert torch.is_grad_enabled()


def test_bad_inputs_are_rejected_clearly() -> None:
    model, make_batch = tiny_model("mlp")
    with pytest.raises(TypeError, match="example_inputs"):
        trace(model, [make_batch()["x"]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flavour"):
        trace(model, make_batch(), flavour="jit")


def test_compute_sequence_is_topological() -> None:
    model, make_batch = tiny_model("t5")
    graph = trace(model, make_batch())
    position = {n.name: i for i, n in enumerate(graph.nodes)}
    for node in graph.compute_nodes:
        assert all(position[i] < position[node.name] for i in node.inputs)
    assert any(n.role == COMPUTE and n.layer == "decoder.block.1" for n in graph.nodes)
    assert graph.layers == ("encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1")
