"""Traced causal masks become SDPA's ``is_causal=True``; any other mask is left as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from merak.partitioner import build_stage, shard, trace
from merak.partitioner.causal_attention import ShapeKeyedMask, is_causal_mask
from tiny_models import tiny_model


class MaskedAttention(nn.Module):
    """One attention layer whose mask is built from the input's shape by ``make_mask(n, x)``,
    the way a traced decoder builds it (``padding`` adds a batch-dependent key mask)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)

    def mask(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[1]
        rows = torch.arange(n, device=x.device)[:, None]
        cols = torch.arange(n, device=x.device)[None, :]
        causal = cols <= rows
        if self.kind == "window":
            causal = causal & (rows - cols < 2)
        if self.kind == "float":
            zero = torch.full((n, n), 0.0, device=x.device)
            return zero.masked_fill(~causal, torch.finfo(torch.float32).min)[None, None]
        if keep is not None:
            causal = causal[None, None] & keep[:, None, None, :].bool()
        return causal.expand(x.shape[0], 1, n, n)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, 2, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(x, keep))
        return self.out(o.transpose(1, 2).reshape(b, n, 16)).square().mean()


def _stage(model: nn.Module, inputs: dict, fuse: bool = True, flavour: str = "auto"):
    plan = shard(trace(model, inputs, flavour=flavour), 1)
    return build_stage(plan, 0, fuse=fuse)


def _deciders(stage) -> list[ShapeKeyedMask]:
    return [n.target for n in stage.graph.nodes if isinstance(n.target, ShapeKeyedMask)]


def _loss_and_grads(stage, model: nn.Module, inputs: dict) -> list[torch.Tensor]:
    model.zero_grad()
    (loss,) = stage(inputs, {}).values()
    loss.backward()
    return [loss.detach(), *(p.grad.clone() for p in model.parameters())]


@pytest.mark.parametrize("flavour", ["fx", "export"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_shape_built_causal_mask_becomes_is_causal_with_equal_values_and_grads(kind: str, flavour: str) -> None:
    torch.manual_seed(0)
    model = MaskedAttention(kind)
    x = torch.randn(3, 8, 16)
    fused, plain = _stage(model, {"x": x}, flavour=flavour), _stage(model, {"x": x}, fuse=False, flavour=flavour)
    assert fused.flavour == flavour
    assert fused.fusions["causal-attention"] == 1 and plain.fusions == {}
    for seq in (8, 5):  # the stage is shape-dynamic: a second length gets its own decision
        inputs = {"x": torch.randn(2, seq, 16)}
        for a, b in zip(_loss_and_grads(fused, model, inputs), _loss_and_grads(plain, model, inputs)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    (decider,) = _deciders(fused)
    assert [causal for _, causal in decider._decisions.values()] == [True, True]
    assert not any("arange" in str(n.target) for n in fused.graph.nodes)  # the mask is no longer built
    twin = copy.deepcopy(fused)  # StageModule copies keep the rewritten graph working
    inputs = {"x": torch.randn(2, 8, 16)}
    (got,), (want,) = twin(inputs, {}).values(), plain(inputs, {}).values()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_shape_built_mask_that_is_not_causal_is_still_passed_to_attention() -> None:
    torch.manual_seed(0)
    model = MaskedAttention("window")
    inputs = {"x": torch.randn(2, 6, 16)}
    fused, plain = _stage(model, inputs), _stage(model, inputs, fuse=False)
    for a, b in zip(_loss_and_grads(fused, model, inputs), _loss_and_grads(plain, model, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    (decider,) = _deciders(fused)
    assert [causal for _, causal in decider._decisions.values()] == [False]


def test_a_mask_that_depends_on_the_batch_is_not_touched() -> None:
    model = MaskedAttention("bool")
    keep = torch.ones(2, 6, dtype=torch.long)
    keep[0, -2:] = 0
    stage = _stage(model, {"x": torch.randn(2, 6, 16), "keep": keep})
    assert "causal-attention" not in stage.fusions and not _deciders(stage)


class MutatedMask(MaskedAttention):
    """The mask's ``arange`` is updated in place after the mask sub-graph read it."""

    def mask(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[1]
        rows = torch.arange(n, device=x.device)
        rows.add_(0)
        return rows[None, :] <= rows[:, None]


def test_a_mask_sub_graph_with_an_in_place_update_is_not_touched() -> None:
    stage = _stage(MutatedMask("bool"), {"x": torch.randn(2, 6, 16)}, flavour="fx")
    assert "causal-attention" not in stage.fusions


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_decoders_cut_in_two_run_every_attention_as_causal_and_keep_the_loss(kind: str) -> None:
    model, make_batch = tiny_model(kind, attn_implementation="sdpa")
    batch = {k: v for k, v in make_batch(batch_size=2, seq_len=12).items() if k != "attention_mask"}
    plan = shard(trace(model, batch), 2)
    stages = [build_stage(plan, s) for s in range(2)]
    layers = model.config.num_hidden_layers
    assert sum(s.fusions.get("causal-attention", 0) for s in stages) == layers
    for seq in (12, 7):
        batch = {k: v[:, :seq] for k, v in batch.items()}
        out0 = stages[0](batch, {})
        loss = stages[1](batch, {k: out0[k] for k in stages[1].recv_inputs})["loss"]
        torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-6, atol=1e-6)
    assert all(causal for s in stages for d in _deciders(s) for _, causal in d._decisions.values())


def test_the_memory_estimator_profiles_a_rewritten_decoder() -> None:
    """The estimator runs the fused graph on meta tensors; the rewrite's new nodes (not in the traced
    graph) must not break it, and the per-stage footprints still count every layer's activations."""
    from merak.runtime.memory.activation_profile import profile_saved_tensors, stage_footprints

    model, make_batch = tiny_model("gpt2", attn_implementation="sdpa")
    batch = {k: v for k, v in make_batch(batch_size=2, seq_len=12).items() if k != "attention_mask"}
    graph = trace(model, batch)
    fused, plain = profile_saved_tensors(graph), profile_saved_tensors(graph, fuse=False)
    assert 0 < fused.total_saved_bytes() <= plain.total_saved_bytes()
    footprints = stage_footprints(shard(graph, 2))
    assert all(part.kept for footprint in footprints for part in footprint.layers)


def test_hf_padding_masks_are_not_rewritten() -> None:
    model, make_batch = tiny_model("llama", attn_implementation="sdpa")
    stage = build_stage(shard(trace(model, make_batch()), 1), 0)  # the batch has an attention_mask
    assert "causal-attention" not in stage.fusions


def test_is_causal_mask_accepts_only_the_exact_lower_triangle() -> None:
    lower = torch.ones(4, 4, dtype=torch.bool).tril()
    assert is_causal_mask(lower) and is_causal_mask(lower.expand(2, 3, 4, 4))
    assert not is_causal_mask(lower.T) and not is_causal_mask(torch.ones(4, 4, dtype=torch.bool))
    assert not is_causal_mask(torch.ones(1, 1, dtype=torch.bool))  # broadcasts over any query length
    assert not is_causal_mask(lower[:, :3]) and not is_causal_mask(lower.to("meta"))
    additive = torch.zeros(4, 4).masked_fill(~lower, float("-inf"))
    assert is_causal_mask(additive) and is_causal_mask(additive.masked_fill(~lower, torch.finfo(torch.float32).min))
    assert not is_causal_mask(additive.masked_fill(~lower, -1e4))  # a finite penalty is not a mask
    assert not is_causal_mask(lower.long())


def _causal_gpt2_tp_job(k: int) -> dict:
    """tp=2 stage of a causal (maskless) SDPA GPT-2 whose attention was rewritten: loss and grads."""
    import merak
    from merak.runtime.tensor_parallel import apply_tensor_parallel, plan_tensor_parallel

    grid = merak.init(tp=2)
    model, make_batch = tiny_model("gpt2", attn_implementation="sdpa")
    batch = {k_: v for k_, v in make_batch(batch_size=2, seq_len=12).items() if k_ != "attention_mask"}
    graph = trace(model, batch)
    stage = build_stage(shard(graph, 1), 0)
    rewritten = stage.fusions.get("causal-attention", 0)
    apply_tensor_parallel(stage, grid, plan_tensor_parallel(graph, 2), sub_microbatches=k)
    loss = stage(batch, {})["loss"]
    loss.backward()
    return {"rewritten": rewritten, "loss": loss.detach(), "tp_rank": grid.coord.tp,
            "grads": {n: (p.grad, stage.tp_param_specs.get(n)) for n, p in stage.named_parameters()}}


@pytest.mark.parametrize("k", [1, 2])
def test_tensor_parallel_stages_with_rewritten_attention_match_the_model(dist_run, k: int) -> None:
    model, make_batch = tiny_model("gpt2", attn_implementation="sdpa")
    batch = {k_: v for k_, v in make_batch(batch_size=2, seq_len=12).items() if k_ != "attention_mask"}
    want = model(**batch).loss
    want.backward()
    ref = dict(model.named_parameters(remove_duplicate=False))
    for res in dist_run(_causal_gpt2_tp_job, 2, k, timeout=300):
        assert res["rewritten"] == model.config.n_layer
        torch.testing.assert_close(res["loss"], want.detach(), rtol=1e-6, atol=1e-6)
        for name, (grad, spec) in res["grads"].items():
            full = ref[name].grad
            torch.testing.assert_close(grad, full if spec is None else spec.local(full, res["tp_rank"]),
                                       rtol=1e-5, atol=1e-6, msg=name)
