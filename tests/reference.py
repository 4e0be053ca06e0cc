"""The single-process reference every parity test compares against.

One helper, so that "what a single process would have done" means the same thing everywhere:
the loss of a step is the mean of its micro-batch losses, its gradient is that mean's gradient,
and clipping / LR scheduling happen exactly as a plain PyTorch loop does them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

Batch = Mapping[str, Any]


def hf_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch).loss


def single_process_run(
    model: nn.Module,
    steps: Sequence[Sequence[Batch]],
    optimizer: torch.optim.Optimizer,
    *,
    loss_of: Callable[[nn.Module, Batch], torch.Tensor] = hf_loss,
    scheduler: Any = None,
    max_grad_norm: float | None = None,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train ``model`` one optimizer step per entry of ``steps`` (its micro-batches).

    Returns the loss of every step and the gradients of the first step (by parameter name).
    """
    losses: list[float] = []
    first_grads: dict[str, torch.Tensor] = {}
    for microbatches in steps:
        loss = sum(loss_of(model, b) for b in microbatches) / len(microbatches)
        loss.backward()
        if not first_grads:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, first_grads
