"""Third-party code that calls ``torch.distributed`` itself, routed through the layer for a while.

Transformers' ``Trainer``, which ``MerakTrainer`` inherits, calls ``torch.distributed`` directly
in paths Merak keeps: ``_save_checkpoint`` waits on a bare ``dist.barrier()`` before looking
for the best checkpoint, and ``store_flos`` all-gathers through ``trainer_pt_utils``'
``distributed_broadcast_scalars``. Those calls have no limit: a stuck peer holds every other
rank until the backend's own (30 min) timeout, and the error names no rank, peer or purpose.

Overriding every such method would copy HF's code into ours and miss the next release's new
call. Instead :func:`routed` swaps the ``dist`` name of the given modules, for the duration of a
``with`` block, for a :class:`RoutedDist`: queries (``get_rank``, ``is_initialized``...) pass
through unchanged, the communicating functions HF uses go through :mod:`.collectives` /
:mod:`.objects` - bounded by ``timeout_s`` and named after the calling function - and any other
communicating function raises instead of running unbounded. The swap is undone on exit, so a
plain ``transformers.Trainer`` in the same process is untouched outside the block.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from merak.runtime.distributed import collectives, groups, objects
from merak.runtime.distributed.groups import Group

__all__ = ["RoutedDist", "routed"]

#: torch.distributed functions that communicate but have no bounded equivalent here: refused.
_UNROUTED = frozenset({
    "all_reduce_coalesced", "monitored_barrier", "send", "recv", "isend", "irecv", "send_object_list",
    "recv_object_list", "batch_isend_irecv", "all_gather_into_tensor", "all_gather_coalesced",
    "gather", "gather_object", "scatter", "scatter_object_list", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
})


def _op_name(op: Any) -> collectives.ReduceOpName:
    names = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min", dist.ReduceOp.AVG: "mean"}
    for known, name in names.items():
        if op == known:
            return name  # type: ignore[return-value]
    raise ValueError(f"reduction {op} is not routed through merak's distributed layer")


class RoutedDist:
    """Stands in for the ``torch.distributed`` module inside third-party code (see the module
    docstring). ``owner`` names that code in errors (``"transformers' Trainer"``)."""

    def __init__(self, owner: str, timeout_s: float | None = None, modules: frozenset[str] = frozenset()) -> None:
        self._owner = owner
        self._timeout_s = timeout_s
        self._modules = modules  # names of the modules routed: their frames name the caller

    def __getattr__(self, name: str) -> Any:
        if name in _UNROUTED:
            raise NotImplementedError(f"{self._owner} called torch.distributed.{name}, which merak's "
                                      f"distributed layer does not bound with a timeout yet")
        return getattr(dist, name)

    def _what(self, name: str) -> str:
        """``"torch.distributed.barrier in transformers' Trainer (train > _save_checkpoint)"``: the
        calls inside the routed modules that led here, outermost first (the last few)."""
        chain, frame = [], sys._getframe(2)  # 0: here, 1: the routed function, 2: its caller
        while frame is not None and frame.f_globals.get("__name__") in self._modules:
            chain.append(frame.f_code.co_name)
            frame = frame.f_back
        where = " > ".join(reversed(chain[:4])) or sys._getframe(2).f_code.co_name
        return f"torch.distributed.{name} in {self._owner} ({where})"

    @staticmethod
    def _sync(name: str, async_op: bool) -> None:
        if async_op:
            raise NotImplementedError(f"torch.distributed.{name}(async_op=True) is not routed; "
                                      f"merak's layer waits for it with a timeout")

    def barrier(self, group: Group = None, async_op: bool = False, device_ids: Any = None) -> None:
        self._sync("barrier", async_op)
        collectives.barrier(self._what("barrier"), group=group, timeout_s=self._timeout_s)

    def all_reduce(self, tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Group = None,
                   async_op: bool = False) -> None:
        self._sync("all_reduce", async_op)
        collectives.all_reduce(tensor, self._what("all_reduce"), op=_op_name(op), group=group,
                               timeout_s=self._timeout_s)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, group: Group = None, async_op: bool = False) -> None:
        self._sync("broadcast", async_op)
        collectives.broadcast(tensor, src, self._what("broadcast"), group=group, timeout_s=self._timeout_s)

    def all_gather(self, tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Group = None,
                   async_op: bool = False) -> None:
        self._sync("all_gather", async_op)
        if groups.wants_device(tensor, group) is not None:
            tensor = tensor.to(groups.device(group))
        parts = collectives.all_gather(tensor, self._what("all_gather"), group=group, timeout_s=self._timeout_s)
        for out, part in zip(tensor_list, parts):
            out.copy_(part)

    def all_gather_object(self, object_list: list[Any], obj: Any, group: Group = None) -> None:
        object_list[:] = objects.all_gather_objects(obj, self._timeout_s, self._what("all_gather_object"), group)

    def broadcast_object_list(self, object_list: list[Any], src: int = 0, group: Group = None,
                              device: Any = None) -> None:
        object_list[:] = objects.broadcast_object(list(object_list), src, self._what("broadcast_object_list"),
                                                  group=group, timeout_s=self._timeout_s)


@contextlib.contextmanager
def routed(*modules: ModuleType, owner: str, timeout_s: float | None = None) -> Iterator[RoutedDist]:
    """Within the block, the ``dist`` global of each of ``modules`` is a :class:`RoutedDist`.
    Re-entrant (an inner block restores the outer one's proxy)."""
    proxy = RoutedDist(owner, timeout_s, frozenset(m.__name__ for m in modules))
    saved = [(m, m.__dict__["dist"]) for m in modules if "dist" in m.__dict__]
    for module, _ in saved:
        module.dist = proxy  # type: ignore[attr-defined]
    try:
        yield proxy
    finally:
        for module, previous in reversed(saved):
            module.dist = previous  # type: ignore[attr-defined]
