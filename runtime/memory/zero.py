"""ZeRO-1 for the pipeline: optimizer states sharded over each stage's data-parallel group.

Built on :class:`torch.distributed.optim.ZeroRedundancyOptimizer`, because it composes with the
pipeline as it is (checked, and tested for loss parity):

* Merak's :class:`~merak.runtime.pipeline.grad_reduce.DataParallelReducer` already all-reduces (averages)
  every gradient over the DP group before the step, so every DP rank holds full, identical
  gradients; ZeRO-1 needs nothing more. Each rank then steps only its shard of the parameters
  (so it allocates Adam moments for ~1/dp of them) and broadcasts the updated shard.
* With pp > 1 every stage has its own DP group (``grid.dp_group``), hence its own ZeRO
  partition; a tied parameter (embedding / LM head) lives on two stages, each updating its
  copy in its own group from the same summed gradient and the same state history, so the copies
  stay bitwise equal, as without ZeRO.
* Gradient clipping is unaffected: gradients are not sharded, so the trainer's global norm is
  computed as before. Gloo and NCCL both do the broadcasts.

DeepSpeed's ZeRO-1 was not used: it owns gradient reduction, fp16 master weights and the
model engine (it expects its own ``DeepSpeedEngine``), all of which Merak's executor already does.

What this module adds: the optimizer HF's ``create_optimizer`` built (class and every
per-group hyper-parameter) is rebuilt sharded by :func:`shard_optimizer_states`, and the
parameter broadcasts after each step wait with Merak's timeout and a clear error.
"""

from __future__ import annotations

import logging

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from merak.runtime.distributed import collectives
from merak.runtime.distributed.groups import Group

logger = logging.getLogger("merak")

__all__ = ["ZeroOneOptimizer", "shard_optimizer_states", "local_optimizer", "is_sharded"]


class ZeroOneOptimizer(ZeroRedundancyOptimizer):
    """``ZeroRedundancyOptimizer`` whose post-step parameter broadcasts wait with a timeout
    whose error names this rank and the stage's DP group (instead of hanging until the process
    group's own limit with an anonymous error)."""

    def __init__(self, params, optimizer_class: type[torch.optim.Optimizer], process_group: Group,
                 *, timeout_s: float = 300.0, **defaults) -> None:
        self.timeout_s = timeout_s
        super().__init__(params, optimizer_class, process_group=process_group, **defaults)

    def _sync_params(self) -> None:
        handles = [h for rank in range(self.world_size) for h in self._broadcast_params_from_rank(rank)]
        for handle in handles:
            collectives.wait(handle, "the ZeRO-1 parameter broadcast after the optimizer step",
                             group=self.process_group, timeout_s=self.timeout_s)


def shard_optimizer_states(optimizer: torch.optim.Optimizer, group: Group,
                           group_size: int, timeout_s: float = 300.0) -> torch.optim.Optimizer:
    """Rebuild a fresh (never stepped) ``optimizer`` as ZeRO-1 over ``group``.

    Same class, same parameter groups with every hyper-parameter they carry (learning rate,
    betas, weight decay per group ...); only the states get partitioned. With ``group_size == 1``
    there is nothing to shard and ``optimizer`` is returned unchanged.
    """
    if group_size <= 1:
        return optimizer
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer
    if optimizer.state:
        raise RuntimeError("shard_optimizer_states needs a fresh optimizer: this one has already stepped "
                           "(its states would be lost); shard it right after creating it")
    groups = [dict(g) for g in optimizer.param_groups]
    try:
        return ZeroOneOptimizer(groups, type(optimizer), group, timeout_s=timeout_s)
    except TypeError as exc:
        raise TypeError(
            f"zero_stage=1 rebuilds the optimizer as {type(optimizer).__name__}(param_groups) on each rank's "
            f"shard, which this optimizer does not support ({exc}); use a torch.optim optimizer "
            f"(e.g. optim='adamw_torch') or zero_stage=0"
        ) from exc


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's states: the ZeRO shard's, or ``optimizer`` itself."""
    return optimizer.optim if is_sharded(optimizer) else optimizer


def is_sharded(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s states are partitioned across data-parallel ranks (ZeRO-1)."""
    return isinstance(optimizer, ZeroRedundancyOptimizer)
