"""Object collectives with a timeout: what the trainer needs beyond tensors.

``torch.distributed.all_gather_object`` cannot be waited on with a timeout; this does the same
with two asynchronous tensor all-gathers (sizes, then padded bytes), each bounded by
:func:`~merak.runtime.distributed.p2p.wait_with_timeout`, so a missing rank is named instead of
hanging the job. Used for evaluation predictions, which live on the last stages only.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist

from merak.runtime.distributed.p2p import wait_with_timeout


def all_gather_objects(obj: Any, timeout_s: float, what: str, device: torch.device | str = "cpu") -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a job."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    world = dist.get_world_size()
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    wait_with_timeout(dist.all_gather(sizes, size, async_op=True), timeout_s, f"the sizes of {what}")
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload
    chunks = [torch.zeros_like(padded) for _ in range(world)]
    wait_with_timeout(dist.all_gather(chunks, padded, async_op=True), timeout_s, what)
    return [pickle.loads(c[:int(n)].cpu().numpy().tobytes()) for c, n in zip(chunks, sizes)]


def all_gather_along(tensor: torch.Tensor, dim: int, group: Any, timeout_s: float, what: str) -> torch.Tensor:
    """The tensor-parallel group's shards of ``tensor`` concatenated along ``dim`` (on every
    rank of ``group``), e.g. a vocab-parallel head's logits for predictions."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    wait_with_timeout(dist.all_gather(parts, tensor.contiguous(), group=group, async_op=True), timeout_s, what)
    return torch.cat(parts, dim=dim)
