"""Weightless models: ``init_empty_weights`` and materializing one stage of a big model."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import nn

from merak.partitioner import build_stage, init_empty_weights, shard, trace
from tiny_models import tiny_config, tiny_model


def test_init_empty_weights_puts_parameters_on_meta_and_keeps_buffers() -> None:
    register = nn.Module.register_parameter
    model, _ = tiny_model("llama", meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cpu" and torch.isfinite(inv_freq).all()
    assert nn.Module.register_parameter is register
    with pytest.raises(RuntimeError, match="boom"), init_empty_weights(include_buffers=True):
        layer = nn.BatchNorm1d(4)
        assert layer.running_mean.device.type == "meta" and layer.weight.device.type == "meta"
        raise RuntimeError("boom")
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # patches are undone even on errors


@pytest.mark.parametrize("include_buffers", [False, True])
def test_rotary_inv_freq_comes_out_right(include_buffers: bool) -> None:
    from transformers import LlamaForCausalLM

    real, make_batch = tiny_model("llama")
    with init_empty_weights(include_buffers=include_buffers):
        model = LlamaForCausalLM(tiny_config("llama"))
    graph = trace(model, {k: v.to("meta") for k, v in make_batch().items()})
    plan = shard(graph, 2)
    for s in range(2):
        stage = build_stage(plan, s)
        for name, buf in stage.named_buffers():
            if name.endswith("inv_freq"):
                torch.testing.assert_close(buf, real.get_buffer(name), atol=0, rtol=0)
    assert "model.rotary_emb.inv_freq" not in stage.state_dict()  # non-persistent stays non-persistent


class Custom(nn.Module):
    """A parameter no init function knows about."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.lin(x) * self.scale).sum()


def test_a_parameter_no_init_sets_is_reported() -> None:
    with init_empty_weights():
        model = Custom()
    plan = shard(trace(model, {"x": torch.empty(2, 4, device="meta")}), 1)
    with pytest.raises(RuntimeError, match=r"\['scale'\].*reset_parameters"):
        build_stage(plan, 0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_one_stage_of_gpt2_xl_from_meta_costs_only_its_own_memory() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=48, n_embd=1600, n_head=25)
    with init_empty_weights():
        model = GPT2LMHeadModel(config)
    model_bytes = sum(p.numel() for p in model.parameters()) * 4
    ids = torch.empty(1, 128, dtype=torch.long, device="meta")
    plan = shard(trace(model, {"input_ids": ids, "labels": ids}), 16)
    gc.collect()
    before = _rss_bytes()
    stage = build_stage(plan, 1)
    grown = _rss_bytes() - before
    stage_bytes = sum(p.numel() for p in stage.parameters()) * 4
    assert 0 < stage_bytes < model_bytes / 10
    assert grown < model_bytes / 10, f"RSS grew {grown / 2**20:.0f} MiB, model is {model_bytes / 2**20:.0f} MiB"
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in stage.parameters())
