"""The ``offload`` action: saved activations go to host memory and come back for backward.

``torch.autograd.graph.save_on_cpu`` minus three wastes:

* it copies parameters (and received inputs: they stay referenced anyway) to host memory every
  micro-batch - here leaves that require grad stay in place;
* on a CPU-only run it copies CPU tensors to new CPU tensors, doubling instead of saving memory -
  here CPU tensors stay in place (the CPU path is a no-op);
* on CUDA it copies on the compute stream, so every device->host copy serialises with the
  kernels around it - here the copy runs on a dedicated **side stream** per device: the side
  stream first waits for the compute stream (the tensor must be written), copies into pinned
  memory and records an event; the tensor is marked as used by the side stream so the caching
  allocator does not hand its memory out before the copy ends. In backward the compute stream
  waits for that event on the device (no host synchronisation) before copying back.

:func:`copy_plan` and :func:`side_stream` are the decisions, kept apart from the hooks so they
can be tested on a machine without a GPU.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["OffloadToHost", "copy_plan", "side_stream"]

CopyPlan = Literal["keep", "side_stream", "blocking"]

_SIDE_STREAMS: dict[torch.device, Any] = {}


def copy_plan(t: torch.Tensor) -> CopyPlan:
    """How a saved tensor is offloaded: ``keep`` (already on the host, or a leaf that requires
    grad), ``side_stream`` (CUDA: asynchronous copy on the offload stream) or ``blocking``
    (another accelerator: a plain copy on its current stream)."""
    if t.device.type == "cpu" or (t.is_leaf and t.requires_grad):
        return "keep"
    return "side_stream" if t.device.type == "cuda" else "blocking"


def side_stream(device: torch.device) -> Any:
    """The offload stream of CUDA ``device`` (one per device, created on first use; never the
    compute stream, so copies overlap the kernels around them)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"side streams exist for CUDA devices only, not {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def _to_host_async(t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    stream = side_stream(t.device)
    stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete on the compute stream
    host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    t.record_stream(stream)  # its memory is reused only after the copy finished
    return host, done


class OffloadToHost(saved_tensors_hooks):
    """Saved tensors of the block go to host memory and come back in backward (see the module)."""

    def __init__(self) -> None:
        def pack(t: torch.Tensor) -> Any:
            plan = copy_plan(t)
            if plan == "keep":
                return t
            if plan == "side_stream":
                host, done = _to_host_async(t)
                return t.device, host, done
            return t.device, t.to("cpu"), None

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, host, done = packed
            if done is None:
                return host.to(device)
            torch.cuda.current_stream(device).wait_event(done)  # device-side wait, no host sync
            return host.to(device, non_blocking=True)

        super().__init__(pack, unpack)
