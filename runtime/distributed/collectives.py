"""Tensor collectives with a timeout, on the group's device: the project's only caller of
``torch.distributed`` collectives (point-to-point lives in :mod:`.p2p`, objects in :mod:`.objects`).

Why one layer: code that is only right under gloo (a loss tensor built on the host, a wait with
no limit, a reduction on the wrong group) passes every CPU test and fails on the first GPU job.
Here every function

* waits at most ``timeout_s`` (default ``MERAK_TIMEOUT_S``) and raises naming this rank, the
  group (``"the group of ranks [0, 2]"``) and what was awaited;
* creates the tensors it needs on the group's device (:func:`.groups.device`: NCCL -> the
  current CUDA device, gloo -> CPU) and moves a caller's tensor there and back if it must;
* is a no-op (returns its input) without a process group or with a one-rank group.

``tests/test_distributed_layer.py`` fails if a module outside ``runtime/distributed/`` calls a
collective or p2p function of ``torch.distributed`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

from merak.runtime.distributed import groups
from merak.runtime.distributed.groups import Group
from merak.runtime.distributed.p2p import P2PTimeoutError, wait_with_timeout

__all__ = [
    "ReduceOpName", "wait", "all_reduce", "all_reduce_async", "reduce_values", "any_rank", "broadcast",
    "barrier", "all_gather", "all_gather_async", "all_gather_along", "gather", "all_to_all_single",
    "reduce_scatter",
]

ReduceOpName = Literal["sum", "mean", "max", "min"]

#: "mean" is a sum followed by a division by the group size (gloo has no AVG).
_OPS: dict[str, Any] = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
                        "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _op(op: ReduceOpName) -> Any:
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(f"unknown reduction {op!r}; use one of {sorted(_OPS)}") from None


def _timeout(timeout_s: float | None) -> float:
    return groups.default_timeout_s() if timeout_s is None else timeout_s


def _issue(start: Callable[[], Any], what: str, group: Group) -> Any:
    """Start a collective; a peer that is already gone can make gloo raise right here, before
    any wait, so that error too names this rank, the group and what."""
    try:
        return start()
    except RuntimeError as exc:
        raise P2PTimeoutError(f"rank {groups.rank()} could not start {what} over {groups.describe(group)} "
                              f"(a peer probably died; check its log). [backend said: {str(exc).strip()[:200]}]"
                              ) from exc


def wait(work: Any, what: str, *, group: Group = None, timeout_s: float | None = None) -> None:
    """Wait for an asynchronous collective; past ``timeout_s`` raise naming rank, group and what."""
    if work is not None:
        wait_with_timeout(work, _timeout(timeout_s), f"{what} over {groups.describe(group)}")


def all_reduce_async(tensor: torch.Tensor, *, op: ReduceOpName = "sum", group: Group = None,
                     what: str = "an all-reduce") -> Any:
    """Start an in-place all-reduce of ``tensor`` (already on the group's device); returns the
    work to :func:`wait` on, ``None`` for a one-rank group. ``"mean"`` is not offered here:
    the division must follow the wait, so use :func:`all_reduce` or divide after waiting."""
    if op == "mean":
        raise ValueError("all_reduce_async cannot average: reduce with 'sum' and divide after wait()")
    if not groups.is_active(group):
        return None
    return _issue(lambda: dist.all_reduce(tensor, op=_op(op), group=group, async_op=True), what, group)


def all_reduce(tensor: torch.Tensor, what: str, *, op: ReduceOpName = "sum", group: Group = None,
               timeout_s: float | None = None) -> torch.Tensor:
    """Reduce ``tensor`` in place over ``group`` (sum, mean, max or min) and return it.

    A tensor on another device than the group's (a host tensor under NCCL) is reduced on the
    group's device and copied back, so callers never hand NCCL a CPU tensor by accident.
    """
    if not groups.is_active(group):
        return tensor
    target = groups.wants_device(tensor, group)
    buffer = tensor if target is None else tensor.to(target)
    work = _issue(lambda: dist.all_reduce(buffer, op=_op(op), group=group, async_op=True), what, group)
    wait(work, what, group=group, timeout_s=timeout_s)
    if op == "mean":
        buffer.div_(groups.size(group))
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def reduce_values(values: Sequence[float], what: str, *, op: ReduceOpName = "sum", group: Group = None,
                  timeout_s: float | None = None, dtype: torch.dtype = torch.float64) -> list[float]:
    """Reduce a few Python numbers (losses, token counts, metrics, squared norms) over ``group``;
    the tensor carrying them is built on the group's device, the result comes back as floats."""
    if not groups.is_active(group):
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=dtype, device=groups.device(group))
    return [float(v) for v in all_reduce(t, what, op=op, group=group, timeout_s=timeout_s).tolist()]


def any_rank(flag: bool, what: str, *, group: Group = None, timeout_s: float | None = None) -> bool:
    """``True`` on every rank when ``flag`` is true on any rank (e.g. an fp16 overflow)."""
    return reduce_values([float(flag)], what, op="max", group=group, timeout_s=timeout_s)[0] > 0


def broadcast(tensor: torch.Tensor, src: int, what: str, *, group: Group = None,
              timeout_s: float | None = None) -> torch.Tensor:
    """Overwrite ``tensor`` with global rank ``src``'s copy, in place; returns it."""
    if not groups.is_active(group):
        return tensor
    target = groups.wants_device(tensor, group)
    buffer = tensor if target is None else tensor.to(target)
    work = _issue(lambda: dist.broadcast(buffer, src=src, group=group, async_op=True), what, group)
    wait(work, what, group=group, timeout_s=timeout_s)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def barrier(what: str, *, group: Group = None, timeout_s: float | None = None) -> None:
    """Every rank of ``group`` reaches this point before any leaves it (bounded wait)."""
    if groups.is_active(group):
        wait(_issue(lambda: dist.barrier(group=group, async_op=True), what, group), what, group=group,
             timeout_s=timeout_s)


def all_gather_async(tensor: torch.Tensor, *, group: Group = None,
                     what: str = "an all-gather") -> tuple[Any, list[torch.Tensor]]:
    """Start gathering every rank's ``tensor`` (same shape everywhere, on the group's device);
    returns the work and the list the parts land in, in group-rank order."""
    tensor = tensor.contiguous()
    if not groups.is_active(group):
        return None, [tensor]
    parts = [torch.empty_like(tensor) for _ in range(groups.size(group))]
    return _issue(lambda: dist.all_gather(parts, tensor, group=group, async_op=True), what, group), parts


def all_gather(tensor: torch.Tensor, what: str, *, group: Group = None,
               timeout_s: float | None = None) -> list[torch.Tensor]:
    """Every rank's ``tensor``, in group-rank order, on every rank."""
    work, parts = all_gather_async(tensor, group=group, what=what)
    wait(work, what, group=group, timeout_s=timeout_s)
    return parts


def all_gather_along(tensor: torch.Tensor, dim: int, group: Group, timeout_s: float | None, what: str) -> torch.Tensor:
    """The group's shards of ``tensor`` concatenated along ``dim`` (on every rank of ``group``),
    e.g. a vocab-parallel head's logits for predictions."""
    return torch.cat(all_gather(tensor, what, group=group, timeout_s=timeout_s), dim=dim)


def gather(tensor: torch.Tensor, what: str, *, group: Group = None,
           timeout_s: float | None = None) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` on the group's first rank (in group-rank order); ``None`` elsewhere."""
    tensor = tensor.contiguous()
    if not groups.is_active(group):
        return [tensor]
    first = groups.rank(group) == 0
    parts = [torch.empty_like(tensor) for _ in range(groups.size(group))] if first else None
    dst = dist.get_global_rank(group, 0) if group is not None else 0
    work = _issue(lambda: dist.gather(tensor, parts, dst=dst, group=group, async_op=True), what, group)
    wait(work, what, group=group, timeout_s=timeout_s)
    return parts


def all_to_all_single(tensor: torch.Tensor, send_rows: list[int], recv_rows: list[int], what: str, *,
                      group: Group = None, timeout_s: float | None = None) -> torch.Tensor:
    """Send ``send_rows[r]`` consecutive rows of ``tensor`` to group rank ``r`` and receive
    ``recv_rows[r]`` rows from it; returns the received rows, concatenated in rank order."""
    out = tensor.new_empty((sum(recv_rows), *tensor.shape[1:]))
    if not groups.is_active(group):
        return out.copy_(tensor)
    work = _issue(lambda: dist.all_to_all_single(out, tensor.contiguous(), recv_rows, send_rows, group=group,
                                                 async_op=True), what, group)
    wait(work, what, group=group, timeout_s=timeout_s)
    return out


def reduce_scatter(tensor: torch.Tensor, what: str, *, op: ReduceOpName = "sum", group: Group = None,
                   timeout_s: float | None = None) -> torch.Tensor:
    """This rank's chunk (along dim 0, split in group-size equal parts) of the reduction of
    ``tensor`` over ``group``. Gloo has no reduce-scatter: there it is an all-reduce and a slice
    (same result, more traffic); NCCL runs the real collective."""
    n = groups.size(group)
    if tensor.shape[0] % n:
        raise ValueError(f"reduce_scatter of {what}: dimension 0 ({tensor.shape[0]}) does not split over {n} ranks")
    if not groups.is_active(group):
        return tensor.clone()
    me = groups.rank(group)
    if "nccl" not in str(dist.get_backend(group)).lower():
        full = all_reduce(tensor.clone(), what, op=op, group=group, timeout_s=timeout_s)
        return full.chunk(n, dim=0)[me].clone()
    out = tensor.new_empty((tensor.shape[0] // n, *tensor.shape[1:]))
    work = _issue(lambda: dist.reduce_scatter_tensor(out, tensor.contiguous(), op=_op(op), group=group, async_op=True),
                  what, group)
    wait(work, what, group=group, timeout_s=timeout_s)
    return out.div_(n) if op == "mean" else out
