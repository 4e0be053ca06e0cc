"""The executor's side of an :class:`~merak.runtime.memory.policy.ActivationPlan`: one stage's
forward with each layer's action applied, per micro-batch.

``StageActivations(stage, actions)`` regroups the stage graph (:mod:`.layer_graph`) so each
non-kept layer - or, for ``selective``, each attention core - runs as one call, wrapped by its
action:

* ``recompute`` / ``selective``: a :class:`~.layer_checkpoint.RecomputeFrame` per call and
  micro-batch; :meth:`StageActivations.recompute` re-runs all frames of a micro-batch at once
  (the schedule's ``RECOMPUTE`` instruction), backward then finds their tensors ready;
* ``offload``: :class:`~.offload.OffloadToHost` hooks while the layer runs;
* ``keep``: nothing.

Why the switch is per micro-batch, and explicit: a schedule gives ``RECOMPUTE`` instructions only
to the micro-batches that must drop memory (the shifted-critical-path schedule spares those in a
stage's cool-down), so the executor says, for each forward, which micro-batch runs and whether
its actions apply (``apply=False`` runs the stage's own forward, keeping everything).

A stage without repeated layers (or the default plan of an executor given none) has one unit,
``WHOLE_STAGE``: the whole ``stage(data, received)`` call is the region, which is also how a
stage whose ``forward`` was replaced (tensor parallelism with sub-micro-batches) or that is not
an fx graph recomputes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn

from merak.runtime.memory.policy import WHOLE_STAGE, LayerAction
from merak.runtime.memory.layer_checkpoint import RecomputeFrame
from merak.runtime.memory.offload import OffloadToHost
from merak.runtime.memory.layer_graph import Region, attention_cores, build_program, layer_ranges

logger = logging.getLogger(__name__)

__all__ = ["StageActivations"]


class _RegionCall(nn.Module):
    """A driver-graph call of one region: hands the region to its :class:`StageActivations`."""

    def __init__(self, owner: "StageActivations", label: str, action: LayerAction, fn: fx.GraphModule) -> None:
        super().__init__()
        self.fn, self.label, self.action = fn, label, action
        self.owner = owner

    def forward(self, *args: Any) -> Any:
        return self.owner._run(self.label, self.action, self.fn, args)


class StageActivations:
    """Runs ``stage``'s forward with per-layer ``actions`` (``{layer: action}``; absent = keep).

    ``device`` is where the stage computes (its RNG is restored for recomputation, offload pins
    host memory on CUDA).
    """

    def __init__(self, stage: nn.Module, actions: Mapping[str, LayerAction | str],
                 device: torch.device | str = "cpu") -> None:
        self.stage, self.device = stage, torch.device(device)
        self.actions = {n: LayerAction(a) for n, a in actions.items() if LayerAction(a) is not LayerAction.KEEP}
        self.regions: list[tuple[Region, LayerAction]] = []
        self._whole: LayerAction | None = None
        self._program: fx.GraphModule | None = None
        self._frames: dict[int, list[RecomputeFrame]] = {}
        self._microbatch: int | None = None
        self._build()

    # ---- set-up -----------------------------------------------------------------------------
    def _build(self) -> None:
        if not self.actions:
            return
        whole = self.actions.get(WHOLE_STAGE)
        if whole is not None and len(self.actions) > 1:
            raise ValueError(f"{WHOLE_STAGE!r} (the whole stage) cannot be combined with per-layer actions "
                             f"{sorted(set(self.actions) - {WHOLE_STAGE})}")
        if whole in (LayerAction.RECOMPUTE, LayerAction.OFFLOAD):
            self._whole = whole
            return
        if not isinstance(self.stage, fx.GraphModule) or "forward" in vars(self.stage):
            self._whole_stage_fallback()
            return
        nodes = list(self.stage.graph.nodes)
        if whole is LayerAction.SELECTIVE:
            spans = {WHOLE_STAGE: (0, len(nodes) - 1)}
        else:
            spans = layer_ranges(nodes, list(self.actions))
            missing = sorted(set(self.actions) - set(spans))
            if missing:
                raise ValueError(f"the activation plan names layers {missing} that this stage does not run; build "
                                 "the plan from the sharding plan the stage was built from")
        for name, action in self.actions.items():
            first, last = spans[name]
            if action is not LayerAction.SELECTIVE:
                self.regions.append((Region(f"layer {name}", first, last), action))
                continue
            cores = attention_cores(nodes, first, last)
            if not cores:
                logger.warning("selective recomputation: no attention core (scaled_dot_product_attention, or "
                               "matmul -> softmax -> matmul) found in %s; it keeps its activations", name)
            self.regions += [(Region(f"attention core {k} of {name}", a, b), action) for k, (a, b) in enumerate(cores)]
        if self.regions:
            actions = dict(self.regions)
            self._program = build_program(self.stage, [r for r, _ in self.regions],
                                          lambda region, fn: _RegionCall(self, region.label, actions[region], fn))

    def _whole_stage_fallback(self) -> None:
        """A stage whose forward is not its fx graph can only be wrapped as a whole."""
        if all(a is LayerAction.RECOMPUTE for a in self.actions.values()):
            logger.info("stage forward is not its fx graph (e.g. tensor-parallel sub-micro-batches): recomputing "
                        "the whole stage instead of layers %s", sorted(self.actions))
            self._whole = LayerAction.RECOMPUTE
            return
        kinds = sorted({a.value for a in self.actions.values()})
        raise ValueError(f"per-layer actions {kinds} need the stage to run its own fx graph, but its forward was "
                         "replaced (tensor parallelism with tp_sub_microbatches > 1) or it is not a GraphModule; "
                         "use tp_sub_microbatches=1, or recompute='full' (whole-stage recomputation)")

    @property
    def active(self) -> bool:
        """Whether any region drops or moves activations."""
        return self._whole is not None or self._program is not None

    def describe(self) -> str:
        if self._whole is not None:
            return f"whole stage: {self._whole.value}"
        if not self.regions:
            return "keep all"
        return ", ".join(f"{r.label}: {a.value}" for r, a in self.regions)

    # ---- per micro-batch ----------------------------------------------------------------------
    def forward(self, microbatch: int, apply: bool, data: Mapping[str, Any],
                received: Mapping[str, Any]) -> dict[str, Any]:
        """The stage's outputs for ``microbatch``; with ``apply`` the layer actions are used."""
        if not (apply and self.active and torch.is_grad_enabled()):
            return self.stage(data, received)
        self._frames.setdefault(microbatch, [])
        self._microbatch = microbatch
        try:
            if self._whole is not None:
                return self._run("the whole stage", self._whole, self.stage, (data, received))
            assert self._program is not None
            return self._program(data, received)
        finally:
            self._microbatch = None

    def recompute(self, microbatch: int) -> None:
        """Re-run every checkpointed region of ``microbatch`` now (its ``RECOMPUTE`` instruction)."""
        for frame in self._frames.get(microbatch, ()):
            frame.recompute()

    def release(self, microbatch: int) -> None:
        """Forget ``microbatch``'s regions (after its backward)."""
        self._frames.pop(microbatch, None)

    def release_all(self) -> None:
        self._frames.clear()

    def _run(self, label: str, action: LayerAction, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        microbatch = self._microbatch
        if microbatch is None:  # the driver called outside forward(): nothing to apply
            return fn(*args)
        if action is LayerAction.OFFLOAD:
            with OffloadToHost():
                return fn(*args)
        frame = RecomputeFrame(fn, args, f"{label} (micro-batch {microbatch})", self.device)
        self._frames[microbatch].append(frame)
        return frame.forward()
