"""Gradient reductions at the end of a pipeline step: tied parameters and data parallelism.

**DP all-reduce overlapped with the last backward** (as DDP does): parameters are grouped into
buckets of about ``bucket_bytes`` in reverse registration order (roughly the order in which
backward finishes them). During the step's *last* backward a post-accumulate-grad hook counts
finished gradients, and a full bucket starts its asynchronous all-reduce at once, while
autograd is still working on earlier layers. :meth:`DataParallelReducer.finish` launches what
is left (parameters that got their gradient outside autograd, e.g. deferred zero-bubble weight
gradients, or none at all), waits with a timeout, and averages.

**Tied parameters** (an embedding used by the first stage and, as LM head, by the last) get
partial gradients on two stages; they are summed over the tie group before the DP average.
Tied parameters are kept out of the overlapped buckets so the two reductions never race.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from merak.runtime.distributed import collectives
from merak.runtime.distributed.groups import Group


def _grads_or_zeros(params: list[nn.Parameter]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


class DataParallelReducer:
    """Bucketed, overlapped gradient averaging over a data-parallel group."""

    def __init__(
        self,
        params: list[nn.Parameter],
        group: Group,
        group_size: int,
        *,
        bucket_bytes: int = 25 * 2**20,
        timeout_s: float = 300.0,
        late: set[int] | None = None,
    ) -> None:
        self.group, self.group_size, self.timeout_s = group, group_size, timeout_s
        late = late or set()
        early = [p for p in params if id(p) not in late]
        self.buckets: list[list[nn.Parameter]] = []
        current: list[nn.Parameter] = []
        size = 0
        for p in reversed(early):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        self.late_bucket = [p for p in params if id(p) in late]
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._armed = False
        self._ready: list[int] = [0] * len(self.buckets)
        self._inflight: dict[int, tuple[Any, torch.Tensor]] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in early] if self.enabled else []

    def close(self) -> None:
        """Remove the gradient hooks (the parameters may outlive this reducer)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @property
    def enabled(self) -> bool:
        return self.group_size > 1

    def arm(self) -> None:
        """Call right before the step's last backward: from now on, full buckets launch."""
        self._armed = True
        self._ready = [0] * len(self.buckets)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self._armed:
            return
        i = self._bucket_of[id(param)]
        self._ready[i] += 1
        if self._ready[i] == len(self.buckets[i]):
            self._launch(i, self.buckets[i])

    def _launch(self, key: int, params: list[nn.Parameter]) -> None:
        flat = _flatten_dense_tensors(_grads_or_zeros(params))
        self._inflight[key] = (collectives.all_reduce_async(
            flat, group=self.group, what=f"data-parallel gradient all-reduce (bucket {key})"), flat)

    def finish(self) -> None:
        """Launch the remaining buckets, wait for all, and write averaged gradients back."""
        self._armed = False
        if not self.enabled:
            return
        for i, bucket in enumerate(self.buckets):
            if i not in self._inflight:
                self._launch(i, bucket)
        if self.late_bucket:
            self._launch(len(self.buckets), self.late_bucket)
        everything = self.buckets + [self.late_bucket]
        for key, (work, flat) in sorted(self._inflight.items()):
            collectives.wait(work, f"data-parallel gradient all-reduce (bucket {key})", group=self.group,
                             timeout_s=self.timeout_s)
            flat.div_(self.group_size)
            grads = [p.grad for p in everything[key]]
            for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)
        self._inflight.clear()


def reduce_tied_gradients(
    tied: dict[str, nn.Parameter], group: Group, group_size: int,
    timeout_s: float = 300.0,
) -> None:
    """Sum the gradients of tied parameters over the tie group (first and last stage)."""
    if group_size <= 1 or not tied:
        return
    params = [tied[k] for k in sorted(tied)]  # same order on both ends of the tie
    flat = _flatten_dense_tensors(_grads_or_zeros(params))
    collectives.all_reduce(flat, f"tied-gradient all-reduce of {sorted(tied)}", group=group, timeout_s=timeout_s)
    for p, reduced in zip(params, _unflatten_dense_tensors(flat, [p.grad for p in params])):
        p.grad.copy_(reduced)


def broadcast_tied_parameters(
    tied: dict[str, nn.Parameter], group: Group, src: int, group_size: int,
    timeout_s: float = 300.0,
) -> None:
    """Make the last stage's copy of a tied parameter equal the first stage's at start-up."""
    if group_size <= 1 or not tied:
        return
    for key in sorted(tied):
        with torch.no_grad():
            collectives.broadcast(tied[key].data, src, f"broadcast of tied parameter {key}", group=group,
                                  timeout_s=timeout_s)
