"""Whole tensors from tensor-parallel shards: export, and the global gradient norm.

Why here and not in :mod:`merak.checkpoint`: only the TP code knows how a parameter was split
(fused q|k|v blocks are sharded block by block, so a plain concatenation of shards would be
wrong). The HF export calls :func:`gather_full_state_dict` to get the stage's state with
full-size tensors, then writes the stage's shard as for ``tp = 1``. Resume checkpoints need
nothing from here: each TP rank saves its own shard with its ``ShardSpec``
(:mod:`merak.train_state`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from merak.runtime.distributed import collectives
from merak.runtime.tensor_parallel.layers import ShardSpec, TPGroup

__all__ = ["gather_full_state_dict", "tp_grad_norm_squared"]


def _gather(tensor: torch.Tensor, spec: ShardSpec, tpg: TPGroup, name: str, to_all: bool) -> torch.Tensor | None:
    tensor = tensor.detach().contiguous()
    what = f"the tensor-parallel gather of {name} for export"
    if to_all:
        parts = collectives.all_gather(tensor, what, group=tpg.group, timeout_s=tpg.timeout_s)
    else:
        parts = collectives.gather(tensor, what, group=tpg.group, timeout_s=tpg.timeout_s)
    return spec.full(parts) if parts is not None else None


def gather_full_state_dict(stage: nn.Module, to_all: bool = False) -> dict[str, torch.Tensor]:
    """``stage.state_dict()`` with every TP-sharded tensor gathered to its full shape.

    Collective over the stage's tensor-parallel group: every TP rank of the stage must call it.
    The full state lands on TP rank 0 (on every rank with ``to_all``); other ranks get ``{}``,
    so only one rank per stage ever holds the whole stage. Tensors are gathered one at a time,
    and a tensor shared by several names (tied weights) is gathered once and stays shared.
    Without tensor parallelism this is ``stage.state_dict()``.
    """
    state = stage.state_dict()
    specs: dict[str, ShardSpec] = getattr(stage, "tp_param_specs", {}) or {}
    tpg: TPGroup | None = getattr(stage, "tp_group", None)
    if not specs or tpg is None or tpg.size == 1:
        return state
    keep = to_all or tpg.rank == 0
    done: dict[int, torch.Tensor | None] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        spec = specs.get(name)
        if spec is None:
            if keep:
                out[name] = tensor
            continue
        key = tensor.untyped_storage().data_ptr()
        if key not in done:
            done[key] = _gather(tensor, spec, tpg, name, to_all)
        if keep:
            out[name] = done[key]
    return out


def tp_grad_norm_squared(stage: nn.Module, exclude: set[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared gradients of TP-sharded parameters on this rank, same for replicated ones).

    The caller all-reduces the first over the TP group (each rank holds a different slice) and
    adds the second once (every TP rank holds the same replicated gradients). ``exclude`` are
    parameter ids not to count (tied copies counted on another stage).
    """
    exclude = exclude or set()
    named = stage.state_dict(keep_vars=True)  # names as the specs key them, for a stage or a rank's chunks
    sharded_ids = {id(named[n]) for n in getattr(stage, "tp_param_specs", {}) or {}}
    device = next((p.device for p in stage.parameters()), torch.device("cpu"))
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    for p in stage.parameters():
        if p.grad is None or id(p) in exclude:
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if id(p) in sharded_ids:
            sharded += sq
        else:
            replicated += sq
    return sharded, replicated
