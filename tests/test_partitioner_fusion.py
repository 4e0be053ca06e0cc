"""Fusion: traced op chains with a native kernel become that kernel, and nothing else changes."""

from __future__ import annotations

import math

import torch
from torch import nn

from merak.partitioner import build_stage, shard, trace
from merak.partitioner.fusion import fuse
from tiny_models import tiny_model


class TanhGelu(nn.Module):
    """Hugging Face's ``NewGELUActivation`` formula, written out as GPT-2 runs it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Mlp(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(8, 32), act, nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x))).sum()


def _stage(model: nn.Module, fuse_ops: bool = True):
    x = torch.randn(4, 8)
    return build_stage(shard(trace(model, {"x": x}), 1), 0, fuse=fuse_ops), x


def _targets(stage) -> set:
    return {n.target for n in stage.graph.nodes if n.op == "call_function"}


def test_tanh_gelu_chain_becomes_one_kernel_with_the_same_values_and_gradients() -> None:
    torch.manual_seed(0)
    model = Mlp(TanhGelu())
    fused, x = _stage(model)
    plain, _ = _stage(model, fuse_ops=False)
    assert fused.fusions == {"tanh-gelu": 1} and plain.fusions == {}
    assert torch.nn.functional.gelu in _targets(fused) and torch.tanh not in _targets(fused)
    assert torch.tanh in _targets(plain)
    grads = []
    for stage in (fused, plain):
        model.zero_grad()
        (out,) = stage({"x": x}, {}).values()
        out.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        grads[-1].append(out.detach())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    gelu = next(n for n in fused.graph.nodes if n.target is torch.nn.functional.gelu)
    assert gelu.meta["merak_module"].startswith("act")  # keeps the module path layer detection relies on


def test_a_chain_whose_intermediates_are_used_elsewhere_is_left_alone() -> None:
    class Shared(nn.Module):  # x ** 3 feeds both the GELU and the output
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.proj(x)
            cube = torch.pow(x, 3.0)
            gelu = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * cube)))
            return gelu.sum() + cube.sum()

    shared, _ = _stage(Shared())
    assert shared.fusions == {} and torch.tanh in _targets(shared)


def test_other_constants_are_not_mistaken_for_the_gelu() -> None:
    class NotGelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.proj(x)
            return (0.5 * x * (1.0 + torch.tanh(0.79788456 * (x + 0.05 * torch.pow(x, 3.0))))).sum()

    stage, _ = _stage(NotGelu())
    assert stage.fusions == {}


def test_gpt2_stages_fuse_every_mlp_activation_and_keep_the_loss() -> None:
    model, make_batch = tiny_model("gpt2")
    batch = make_batch(batch_size=2, seq_len=16)
    plan = shard(trace(model, batch), 2)
    stages = [build_stage(plan, s) for s in range(2)]
    assert sum(s.fusions.get("tanh-gelu", 0) for s in stages) == model.config.n_layer
    out0 = stages[0](batch, {})
    loss = stages[1](batch, {k: out0[k] for k in stages[1].recv_inputs})["loss"]
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-6, atol=1e-6)


def test_fuse_is_idempotent() -> None:
    stage, _ = _stage(Mlp(TanhGelu()))
    assert fuse(stage) == {}
