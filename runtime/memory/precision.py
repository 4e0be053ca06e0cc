"""Mixed precision for the pipeline: autocast compute over fp32 master weights, fp16 loss scaling.

Design, and why:

* **Parameters stay fp32; they are the master weights.** Only the *compute* of a stage's forward
  (and of its recomputation, which re-enters the same forward) runs under
  :func:`torch.autocast`, so matmuls run in bf16/fp16 and the activations that cross pipeline
  stages travel in it (:meth:`MixedPrecision.on_wire`) while gradients accumulate into fp32 ``.grad``
  (autocast's casts are differentiable: the weight gradient is cast back to the weight's dtype),
  the DP/tied all-reduces, clipping and the optimizer all work in fp32 as before. No second copy
  of the weights exists, so checkpoints, ZeRO-1 and exports see plain fp32 parameters; the
  price is one cast of each weight per micro-batch, which autocast caches within a forward.
* **Losses are fp32.** Hugging Face models upcast the logits before their loss; a custom
  ``loss_fn`` is called outside the autocast region and gets the stage outputs as computed.
* **bf16 needs no scaling** (fp32's exponent range). **fp16 does**: gradients of small
  activations underflow. :class:`DynamicLossScaler` multiplies the loss by a scale before
  backward; before the optimizer step the gradients are unscaled and checked for inf/nan. A
  pipeline adds one requirement to the usual recipe (``torch.amp.GradScaler``): every stage holds
  different gradients, so an overflow found on *any* rank must make *every* rank skip the same
  step and back off the same way, or replicas and stages diverge. The check therefore ends in
  one all-reduce (MAX of a 0/1 flag) over the whole world, with Merak's timeout.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, ContextManager, Iterable

import torch

from merak.runtime.distributed import collectives

logger = logging.getLogger("merak")

__all__ = ["DynamicLossScaler", "MixedPrecision", "PRECISION_DTYPES"]

#: Compute dtype per precision name (``None``: plain fp32, no autocast).
PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DynamicLossScaler:
    """fp16 loss scale that halves on overflow and doubles after ``growth_interval`` clean steps.

    Defaults follow DeepSpeed's fp16 block (initial scale 2**16, window 1000, minimum 1).
    ``good_steps`` and ``skipped_steps`` are part of the state, so a resumed run continues the
    same growth schedule (:meth:`state_dict` is JSON-serializable and exact).
    """

    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000
    min_scale: float = 1.0
    good_steps: int = 0  # consecutive steps without overflow since the last change of scale
    skipped_steps: int = 0  # total optimizer steps skipped for overflow

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"loss scale {self.scale} must be a positive finite number (e.g. 65536)")
        if not (0 < self.backoff_factor < 1 < self.growth_factor):
            raise ValueError(f"need 0 < backoff_factor ({self.backoff_factor}) < 1 < growth_factor "
                             f"({self.growth_factor})")
        if self.growth_interval < 1 or self.min_scale <= 0:
            raise ValueError(f"growth_interval ({self.growth_interval}) must be >= 1 and min_scale "
                             f"({self.min_scale}) > 0")

    def update(self, overflow: bool) -> None:
        """After a step's overflow check (identical on every rank): back off or count toward growth."""
        if overflow:
            self.skipped_steps += 1
            self.good_steps = 0
            old, self.scale = self.scale, max(self.scale * self.backoff_factor, self.min_scale)
            if old == self.min_scale:
                logger.warning("fp16 gradients overflow even at the minimum loss scale %g: the step is "
                               "skipped again; the model is diverging (lower the learning rate) or needs "
                               "bf16's range", old)
            else:
                logger.info("fp16 gradient overflow: optimizer step skipped, loss scale %g -> %g", old, self.scale)
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key not in self.__dataclass_fields__:
                raise ValueError(f"unknown loss-scaler state key {key!r} (saved by another Merak version?)")
            setattr(self, key, type(getattr(self, key))(value))


class MixedPrecision:
    """What the executor asks of the precision mode: an autocast region, a loss scale, and an
    overflow verdict before the optimizer step. ``MixedPrecision()`` is plain fp32 (no-ops)."""

    def __init__(self, dtype: torch.dtype | None = None, scaler: DynamicLossScaler | None = None) -> None:
        if dtype not in PRECISION_DTYPES.values():
            raise ValueError(f"mixed-precision dtype {dtype} is not one of bfloat16, float16 or None (fp32)")
        if scaler is not None and dtype is not torch.float16:
            raise ValueError("a loss scaler is only meaningful with fp16 compute (bf16 has fp32's exponent range)")
        self.dtype, self.scaler = dtype, scaler

    @classmethod
    def from_flags(cls, *, bf16: bool = False, fp16: bool = False, **scaler_options: Any) -> "MixedPrecision":
        """From Hugging Face's ``bf16`` / ``fp16`` flags; ``scaler_options`` go to the fp16 scaler."""
        if bf16 and fp16:
            raise ValueError("bf16=True and fp16=True are exclusive; pick one (bf16 when the hardware has it)")
        if fp16:
            return cls(torch.float16, DynamicLossScaler(**scaler_options))
        return cls(torch.bfloat16 if bf16 else None)

    @property
    def name(self) -> str:
        return next(k for k, v in PRECISION_DTYPES.items() if v is self.dtype)

    def autocast(self, device: torch.device) -> ContextManager[Any]:
        """The region a stage's forward (and recomputation) runs in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def on_wire(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """What a stage sends downstream: activations (floating tensors that carry a gradient) in
        the compute dtype. Autocast alone would send the fp32 residual stream (fp32 + bf16 adds
        promote), so this halves the p2p bytes as DeepSpeed's and Megatron's bf16 pipelines do;
        the gradient coming back is then bf16/fp16 too, and autograd casts it to the output's
        dtype. Tensors without a gradient (masks, rotary tables, integer ids) travel unchanged:
        an fp32 mask at ``finfo.min`` would become ``-inf`` in fp16."""
        if self.dtype is None:
            return outputs
        # not detached: the p2p layer sends the sender's requires_grad flag with each tensor
        return {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.requires_grad
                and v.is_floating_point() else v for k, v in outputs.items()}

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The tensor the last stage backpropagates: ``loss`` times the fp16 scale (else ``loss``)."""
        return loss if self.scaler is None else loss * self.scaler.scale

    def unscale_and_check(self, params: Iterable[torch.nn.Parameter], timeout_s: float) -> bool:
        """Collective over the world under fp16 (a no-op otherwise): unscale the gradients of
        ``params`` in place and agree with every rank whether any gradient overflowed. Updates the
        scale; returns ``True`` when the optimizer may step (the same answer on every rank)."""
        if self.scaler is None:
            return True
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
            local = not bool(torch.stack([g.isfinite().all() for g in grads]).all())
        else:
            local = False
        overflow = collectives.any_rank(local, "the fp16 gradient-overflow agreement (all ranks)",
                                        timeout_s=timeout_s)
        self.scaler.update(overflow)
        return not overflow
