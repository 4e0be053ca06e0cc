"""torch.export's grad-mode regions inlined: a ``no_grad`` block of a model fx cannot trace keeps its
eager values and gradients across stages, holds no trace device, and leaves grad mode alone."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from merak.partitioner import TraceError, build_stage, run_sequentially, shard, trace


class ScoresWithoutGrad(nn.Module):
    """Part of the work runs under ``torch.no_grad()`` and creates tensors on the input's device;
    the ``isinstance`` check makes fx fail, so the torch.export fallback traces it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError("x must be a tensor")
        with torch.no_grad():  # a target built from the weights themselves: no gradient through it
            position = torch.arange(x.shape[-1], device=x.device).to(x.dtype) / x.shape[-1]
            target = torch.zeros(x.shape, device=x.device) + self.a(x) * position
        h = torch.relu(self.a(x)) + target
        logits = self.b(h)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class AutocastsItself(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError("x must be a tensor")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.a(x)
        return h.float().sum()


def _devices_in(graph: fx.Graph) -> list[str]:
    found: list[str] = []
    for node in graph.nodes:
        fx.node.map_aggregate((node.args, node.kwargs),
                              lambda a: found.append(f"{node.name}: {a}") if isinstance(a, torch.device) else a)
    return found


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    model = ScoresWithoutGrad()
    graph = trace(model, {"x": torch.randn(4, 8), "labels": torch.tensor([0, 1, 2, 0])})
    return model, graph, [build_stage(shard(graph, 2), s) for s in range(2)]


def test_no_grad_region_is_inlined_with_eager_loss_and_gradients(traced) -> None:
    model, graph, stages = traced
    assert graph.flavour == "export" and "fx tracing failed" in graph.notes[0]
    hops = [n for n in graph.traced.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)]
    assert not hops, hops
    assert not [name for name, _ in graph.traced.graph.owning_module.named_children() if name.startswith("submod")]
    for stage in stages:  # the trace device (cpu) became the stage's device anchor everywhere
        assert not _devices_in(stage.graph), _devices_in(stage.graph)
    assert any(n.target is torch.ops.aten.arange.start or n.target is torch.ops.aten.arange.default
               for s in stages for n in s.graph.nodes)
    batch = {"x": torch.randn(2, 8), "labels": torch.tensor([2, 1])}
    run_sequentially(stages, batch)["loss"].backward()
    got = {n: p.grad for s in stages for n, p in s.named_parameters()}
    model.zero_grad()
    expected = model(**batch)["loss"]
    expected.backward()
    torch.testing.assert_close(run_sequentially(stages, batch)["loss"], expected, atol=1e-6, rtol=0)
    assert got.keys() == {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():  # no gradient flows back through the no_grad target
        torch.testing.assert_close(got[name], param.grad, atol=1e-6, rtol=0)


def test_grad_mode_is_the_callers_after_trace_and_in_stages(traced) -> None:
    _, _, stages = traced
    assert torch.is_grad_enabled()  # the trace (and its cost pass) left it on
    batch = {"x": torch.randn(2, 8), "labels": torch.tensor([2, 1])}
    with torch.no_grad():  # an inlined region switches nothing: the caller's mode holds throughout
        out = run_sequentially(stages, batch)
        assert not torch.is_grad_enabled() and not out["loss"].requires_grad
    assert torch.is_grad_enabled()
    assert run_sequentially(stages, batch)["loss"].requires_grad


def test_autocast_regions_are_refused_naming_the_fix() -> None:
    with pytest.raises(TraceError, match="autocast.*bf16/fp16"):
        trace(AutocastsItself(), {"x": torch.randn(4, 8)})
    assert torch.is_grad_enabled()



class ReenablesGrad(nn.Module):
    """``torch.enable_grad()`` inside ``torch.no_grad()``: export splits it into regions of both modes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError("x must be a tensor")
        with torch.no_grad():
            s = self.a(x).sum(-1, keepdim=True) + torch.ones(1, device=x.device)
            with torch.enable_grad():
                t = self.a(x) * 2  # keeps its gradient
            u = t + s  # does not
        return (self.a(x) * s + t + u).sum()


def test_a_grad_enabled_region_inside_no_grad_keeps_its_gradient() -> None:
    model = ReenablesGrad()
    graph = trace(model, {"x": torch.randn(4, 8)})
    assert graph.flavour == "export"
    stages = [build_stage(shard(graph, 2), s) for s in range(2)]
    x = torch.randn(3, 8)
    run_sequentially(stages, {"x": x})["output"].backward()
    got = {n: p.grad for s in stages for n, p in s.named_parameters()}
    model(x).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, atol=1e-6, rtol=0)
