"""Object collectives with a timeout: picklable Python values across ranks.

``torch.distributed.all_gather_object`` / ``broadcast_object_list`` cannot be waited on with a
timeout; these do the same with tensor collectives of :mod:`.collectives` (sizes first, then the
padded bytes), each bounded and named, and with the byte tensors on the group's device. Used for
evaluation predictions (which live on the last stages only) and rank 0's layout choice.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

from merak.runtime.distributed import collectives, groups
from merak.runtime.distributed.groups import Group

__all__ = ["all_gather_objects", "broadcast_object"]


def _to_bytes(obj: Any, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)


def _from_bytes(t: torch.Tensor, n: int) -> Any:
    return pickle.loads(t[:n].cpu().numpy().tobytes())


def all_gather_objects(obj: Any, timeout_s: float | None, what: str, group: Group = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a job."""
    if not groups.is_active(group):
        return [obj]
    device = groups.device(group)
    payload = _to_bytes(obj, device)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = collectives.all_gather(size, f"the sizes of {what}", group=group, timeout_s=timeout_s)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload
    chunks = collectives.all_gather(padded, what, group=group, timeout_s=timeout_s)
    return [_from_bytes(c, int(n)) for c, n in zip(chunks, sizes)]


def broadcast_object(obj: Any, src: int, what: str, *, group: Group = None, timeout_s: float | None = None) -> Any:
    """Global rank ``src``'s ``obj`` on every rank of ``group`` (other ranks' ``obj`` is ignored)."""
    if not groups.is_active(group):
        return obj
    device = groups.device(group)
    mine = groups.rank() == src
    payload = _to_bytes(obj, device) if mine else None
    size = torch.tensor([payload.numel() if payload is not None else 0], dtype=torch.int64, device=device)
    n = int(collectives.broadcast(size, src, f"the size of {what}", group=group, timeout_s=timeout_s))
    buffer = payload if payload is not None else torch.empty(n, dtype=torch.uint8, device=device)
    collectives.broadcast(buffer, src, what, group=group, timeout_s=timeout_s)
    return obj if mine else _from_bytes(buffer, n)
