"""Offload of saved activations (``runtime/memory/offload.py``): the copy decisions.

No GPU here: the CUDA side-stream choice is checked with stand-ins for tensors and streams
(``benchmarks/gpu_check.py`` measures the overlap on a GPU); the CPU path runs for real and
must leave tensors where they are.
"""

from __future__ import annotations

import types

import pytest
import torch

from merak.runtime.memory import offload
from merak.runtime.memory.offload import OffloadToHost, copy_plan, side_stream


def _fake(device: str, leaf: bool = False, requires_grad: bool = False):
    return types.SimpleNamespace(device=torch.device(device), is_leaf=leaf, requires_grad=requires_grad)


def test_copy_plan_by_device_and_kind():
    assert copy_plan(torch.ones(2)) == "keep"  # already on the host: copying would add memory
    assert copy_plan(_fake("cuda:0", leaf=True, requires_grad=True)) == "keep"  # a parameter
    assert copy_plan(_fake("cuda:0")) == "side_stream"
    assert copy_plan(_fake("meta")) == "blocking"  # an accelerator without our side stream


def test_one_side_stream_per_cuda_device_never_the_current_one(monkeypatch):
    made = []

    class FakeStream:
        def __init__(self, device):
            made.append(device)

    monkeypatch.setattr(offload, "_SIDE_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    first = side_stream(torch.device("cuda"))
    assert side_stream(torch.device("cuda", 0)) is first  # the current device, named or not
    assert side_stream(torch.device("cuda", 1)) is not first
    assert made == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="CUDA devices only"):
        side_stream(torch.device("cpu"))


def test_cpu_path_keeps_tensors_in_place_and_gradients_unchanged():
    hooks = OffloadToHost()
    t = torch.randn(3).exp()  # a CPU activation (not a leaf)
    assert hooks.pack_hook(t) is t and hooks.unpack_hook(t) is t
    x = torch.randn(4, 4, requires_grad=True)
    with hooks:
        y = (x.sin() * x).sum()
    (g,) = torch.autograd.grad(y, x)
    torch.testing.assert_close(g, x.cos() * x + x.sin())
