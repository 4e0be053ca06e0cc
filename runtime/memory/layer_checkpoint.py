"""Activation checkpointing whose recomputation can be triggered *now*, not only by backward.

Why not ``torch.utils.checkpoint``: its non-reentrant variant recomputes a region lazily, the
first time backward unpacks one of the region's saved tensors. A pipeline wants the opposite
order: Merak's shifted-critical-path schedule issues ``RECOMPUTE`` *before* the gradient
arrives, so recomputation overlaps the receive wait, and backward must then find everything
ready. :class:`RecomputeFrame` works as the non-reentrant checkpoint does - the forward runs
under ``saved_tensors_hooks`` whose pack returns a small handle instead of the tensor (leaves that
require grad - parameters, received inputs - are kept: they are alive anyway), and a
recomputation (same inputs, RNG state and autocast state) fills in the tensors the handles
stand for - but exposes :meth:`RecomputeFrame.recompute`. If backward reaches a frame that was
not recomputed, the unpack hook recomputes it then, once.

A handle that autograd drops (its node ran backward) frees its recomputed tensor, so memory is
given back progressively during backward, as with torch's implementation.

The ``offload`` action's hooks live in :mod:`.offload`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils import _pytree as pytree

from merak.runtime.tensor_parallel.random import capture_streams, restored_streams

__all__ = ["RecomputeFrame", "ForwardState"]


@dataclass(frozen=True)
class ForwardState:
    """What a recomputation must reproduce: RNG streams (dropout masks: the default ones and
    the tensor-parallel ranks' own, ``tp_streams``) and autocast settings."""

    cpu_rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    device: torch.device
    autocast: tuple[tuple[str, bool, torch.dtype], ...]
    autocast_cache: bool
    tp_streams: tuple[Any, ...] = ()

    @classmethod
    def capture(cls, device: torch.device) -> "ForwardState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        types = tuple(dict.fromkeys(("cpu", device.type)))
        autocast = tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types)
        return cls(torch.get_rng_state(), cuda, device, autocast, torch.is_autocast_cache_enabled(),
                   capture_streams())

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run a block with this state; the caller's RNG streams are untouched afterwards."""
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            with contextlib.ExitStack() as stack:
                stack.enter_context(restored_streams(self.tp_streams))
                for device_type, enabled, dtype in self.autocast:
                    stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                                       cache_enabled=self.autocast_cache))
                yield


class _Handle:
    """What autograd stores instead of a checkpointed tensor; dropping it frees the tensor."""

    __slots__ = ("frame", "index", "__weakref__")

    def __init__(self, frame: "RecomputeFrame", index: int) -> None:
        self.frame, self.index = frame, index

    def __del__(self) -> None:
        self.frame._forget(self.index)


def _meta(t: torch.Tensor) -> tuple[Any, ...]:
    return tuple(t.shape), t.dtype, t.device


class RecomputeFrame:
    """One checkpointed call ``fn(*args)``: run it keeping only ``args``, recompute on demand.

    ``label`` names the region in errors (e.g. the layer). ``recomputations`` counts how often
    the region was re-run (at most once per frame).
    """

    def __init__(self, fn: Callable[..., Any], args: Sequence[Any], label: str, device: torch.device) -> None:
        self.fn, self.args, self.label = fn, tuple(args), label
        self.state = ForwardState.capture(device)
        self._metas: list[tuple[Any, ...]] = []
        self._alive: set[int] = set()
        self._values: dict[int, torch.Tensor] | None = None
        self.recomputations = 0

    @property
    def recomputed(self) -> bool:
        return self._values is not None

    def forward(self) -> Any:
        """The original forward, with autograd: builds the graph but saves only handles."""
        with saved_tensors_hooks(self._pack, self._unpack):
            return self.fn(*self.args)

    def recompute(self) -> None:
        """Re-run the region now (no-op if already done) and hold the tensors backward will ask for."""
        if self._values is not None:
            return
        values: dict[int, torch.Tensor] = {}
        counter = itertools.count()

        def pack(t: torch.Tensor) -> None:
            i = next(counter)
            if i < len(self._metas) and _meta(t) != self._metas[i]:
                raise RuntimeError(self._mismatch(f"saved tensor {i} is {_meta(t)}, was {self._metas[i]}"))
            if i in self._alive:
                values[i] = t.detach()

        def unpack(_: None) -> torch.Tensor:
            raise RuntimeError(f"{self.label}: backward through a recomputation graph (internal error)")

        inputs = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().requires_grad_(t.requires_grad), self.args)
        with self.state.restored(), torch.enable_grad(), saved_tensors_hooks(pack, unpack):
            self.fn(*inputs)
        count = next(counter)
        if count != len(self._metas):
            raise RuntimeError(self._mismatch(f"it saved {count} tensors, the forward {len(self._metas)}"))
        self._values = values
        self.recomputations += 1

    # ---- hooks -----------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> _Handle | torch.Tensor:
        index = len(self._metas)
        self._metas.append(_meta(t))
        if t.is_leaf and t.requires_grad:
            return t  # a parameter or received input: alive anyway, nothing to recompute
        self._alive.add(index)
        return _Handle(self, index)

    def _unpack(self, handle: _Handle | torch.Tensor) -> torch.Tensor:
        if isinstance(handle, torch.Tensor):
            return handle
        if self._values is None:
            self.recompute()  # backward arrived before (or without) a RECOMPUTE instruction
        assert self._values is not None
        return self._values[handle.index]

    def _forget(self, index: int) -> None:
        self._alive.discard(index)
        if self._values is not None:
            self._values.pop(index, None)

    def _mismatch(self, detail: str) -> str:
        return (f"recomputing {self.label} did not reproduce its forward ({detail}): the region has "
                "data-dependent control flow or non-deterministic ops; keep this layer (action 'keep') "
                "or make the region deterministic")

