"""Deferred weight gradients: what makes zero-bubble schedules possible in eager PyTorch.

ZB-H1 splits a stage's backward into B (gradient w.r.t. the stage *input*, on the critical path
because the previous stage waits for it) and W (gradients w.r.t. the *weights*, needed only by
the optimizer step, so they can fill pipeline bubbles). Autograd computes both together, so we
intercept the layers that own nearly all weight-gradient FLOPs — ``nn.Linear`` and Hugging
Face's ``Conv1D`` — with an autograd function whose backward returns the input gradient at
once and queues the weight-gradient matmul, grouped by micro-batch, for the W instruction.
Everything else (norms, embeddings, biases) still gets its gradient during B; that is cheap.

The patch is per module *instance* (its ``forward`` is replaced), so parameter names, state
dicts and the fx graph that calls the module are untouched. Results are bitwise those of the
unsplit backward up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator

import torch
from torch import nn


class WeightGradStore:
    """Queue of deferred weight-gradient closures, keyed by micro-batch."""

    def __init__(self) -> None:
        self._queues: dict[int, list[Callable[[], None]]] = {}
        self._current: int | None = None

    @contextlib.contextmanager
    def deferring(self, microbatch: int) -> Iterator[None]:
        """Within this block, patched layers queue their weight gradients under ``microbatch``."""
        self._current = microbatch
        self._queues.setdefault(microbatch, [])
        try:
            yield
        finally:
            self._current = None

    @property
    def active(self) -> bool:
        return self._current is not None

    def put(self, fn: Callable[[], None]) -> None:
        assert self._current is not None
        self._queues[self._current].append(fn)

    def flush(self, microbatch: int) -> int:
        """Run (and forget) the weight gradients of one micro-batch; returns how many ran."""
        queue = self._queues.pop(microbatch, [])
        with torch.no_grad():
            for fn in queue:
                fn()
        return len(queue)

    def pending(self) -> list[int]:
        return sorted(mb for mb, q in self._queues.items() if q)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class _DeferredLinear(torch.autograd.Function):
    """y = x @ W.T + b (Linear) or x @ W + b (Conv1D, ``transposed=True``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, store, transposed):  # type: ignore[override]
        param = weight
        if torch.is_autocast_enabled(x.device.type):
            # What autocast does for F.linear / addmm: compute in its dtype (the output, hence the
            # activations, stay bf16/fp16); W casts the weight gradient back to the parameter's.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        # The parameter object itself, not a saved tensor: under saved_tensors_hooks (activation
        # checkpointing, offload) autograd unpacks saved tensors as new tensor objects, and a
        # gradient accumulated into such a copy would never reach the parameter.
        ctx.param = param
        ctx.store, ctx.transposed, ctx.has_bias = store, transposed, bias is not None
        y = x @ weight if transposed else x @ weight.t()
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        param = ctx.param
        grad_x = grad_y @ (weight.t() if ctx.transposed else weight) if ctx.needs_input_grad[0] else None
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[1]:
            transposed = ctx.transposed

            def weight_grad(x=x, grad_y=grad_y, param=param) -> None:
                x2, g2 = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])
                _accumulate(param, (x2.t() @ g2 if transposed else g2.t() @ x2).to(param.dtype))

            if ctx.store.active:
                ctx.store.put(weight_grad)
            else:
                weight_grad()
        return grad_x, None, grad_b, None, None


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): weight is (in_features, out_features); avoid importing it.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def defer_weight_gradients(root: nn.Module, store: WeightGradStore) -> list[str]:
    """Patch every Linear / Conv1D under ``root`` to queue its weight gradient in ``store``.

    Returns the qualified names of the patched modules.
    """
    patched = []
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear):
            transposed = False
        elif _is_conv1d(module):
            transposed = True
        else:
            continue

        def forward(self: nn.Module, x: torch.Tensor, _t: bool = transposed) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return type(self).forward(self, x)
            return _DeferredLinear.apply(x, self.weight, self.bias, store, _t)

        module.forward = types.MethodType(forward, module)
        patched.append(name)
    return patched
