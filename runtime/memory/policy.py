"""What happens to each layer's saved activations between its forward and its backward.

Why a per-layer choice: activation memory is spent layer by layer, and the pipeline stages differ
in how many micro-batches they hold in flight (stage ``s`` of a ``P``-stage 1F1B holds up to
``P - s``). A stage that is short of memory recomputes or offloads some layers; a stage with
idle memory keeps them. :class:`ActivationPlan` is the value object that the memory planner
(``merak.runtime.memory.estimator``) produces, the executor applies (:mod:`merak.runtime.memory.stage_activations`),
and the schedules/simulator read (through :meth:`ActivationPlan.recompute_plan`).

Actions per layer (layers are the repeated blocks the partitioner found, e.g.
``transformer.h.3``; nodes outside any layer - embeddings, final norm, head - are always kept):

* ``keep``       - autograd saves what it saves (fastest, most memory),
* ``recompute``  - only the layer's inputs are saved; the layer is re-run before its backward,
* ``selective``  - like Megatron's selective recomputation: only the attention core
  (scores, softmax, dropout, attention x values) is recomputed, the rest is kept,
* ``offload``    - saved tensors are moved to host memory and back, paying link time instead of
  compute.

A stage in which the partitioner found no repeated layer has one unit, :data:`WHOLE_STAGE`: the
whole stage is kept, recomputed or offloaded at once.

The actions apply only to the micro-batches that have a ``RECOMPUTE`` instruction in the stage's
list: the schedule decides which micro-batches need to drop memory (the shifted-critical-path
schedule lets those in a stage's cool-down keep everything, since their backward follows before
the memory peak).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from merak.runtime.memory.recompute_plan import RECOMPUTE_MODES, RecomputePlan

if TYPE_CHECKING:
    from merak.partitioner.sharding import PartitionPlan

__all__ = ["LayerAction", "ActivationPlan", "WHOLE_STAGE", "stage_layers"]

#: The one unit of a stage without repeated layers (the whole stage forward).
WHOLE_STAGE = "*"


class LayerAction(str, enum.Enum):
    """What one layer does with its saved activations (see the module docstring)."""

    KEEP = "keep"
    RECOMPUTE = "recompute"
    SELECTIVE = "selective"
    OFFLOAD = "offload"


def stage_layers(sharding_plan: "PartitionPlan") -> tuple[tuple[str, ...], ...]:
    """Per stage, the repeated layers it computes, in execution order (``(WHOLE_STAGE,)`` for a
    stage without any). A layer cut in two by a stage boundary counts on both stages."""
    out = []
    for stage in range(sharding_plan.num_stages):
        names = tuple(dict.fromkeys(n.layer for n in sharding_plan.stage_nodes(stage) if n.layer is not None))
        out.append(names or (WHOLE_STAGE,))
    return tuple(out)


@dataclass(frozen=True)
class ActivationPlan:
    """Per pipeline stage, the action of each of its layers; layers not named are kept.

    ``layers`` lists every layer of every stage (kept ones included); it is what
    :meth:`recompute_plan` divides by. When empty, the layers named in ``stages`` are taken as
    all of them.
    """

    stages: tuple[Mapping[str, LayerAction], ...]
    layers: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        stages = []
        for stage, actions in enumerate(self.stages):
            try:
                stages.append({name: LayerAction(a) for name, a in actions.items()})
            except ValueError as exc:
                raise ValueError(f"stage {stage}: {exc}; actions are {[a.value for a in LayerAction]}") from None
        if not stages:
            raise ValueError("an activation plan needs one entry per stage (got none)")
        layers = tuple(tuple(names) for names in self.layers)
        if layers and len(layers) != len(stages):
            raise ValueError(f"activation plan has {len(stages)} stages but layers for {len(layers)}")
        for stage, names in enumerate(layers):
            unknown = sorted(set(stages[stage]) - set(names))
            if unknown:
                raise ValueError(f"stage {stage}: actions for {unknown}, which are not among its layers {list(names)}")
        object.__setattr__(self, "stages", tuple(stages))
        object.__setattr__(self, "layers", layers)

    def actions(self, stage: int) -> dict[str, LayerAction]:
        """``{layer name: action}`` of ``stage`` (only layers whose action is not ``keep``)."""
        return {name: a for name, a in self.stages[stage].items() if a is not LayerAction.KEEP}

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_layer_names(self, stage: int) -> tuple[str, ...]:
        return self.layers[stage] if self.layers else tuple(self.stages[stage])

    def recompute_plan(self) -> RecomputePlan:
        """The per-stage fractions the schedules and the simulator read: the share of each stage's
        layers that do not keep their activations.

        A stage with a non-zero fraction gets ``RECOMPUTE`` instructions, which is also what
        switches on the layer actions for a micro-batch, so selective and offloaded layers count
        as whole layers here (the simulator then charges them the full recompute cost: an upper
        bound).
        """
        fractions = []
        for stage in range(self.num_stages):
            names = self.stage_layer_names(stage)
            fractions.append(len(self.actions(stage)) / len(names) if names else 0.0)
        return RecomputePlan(tuple(fractions))

    @classmethod
    def from_mode(cls, mode: str, sharding_plan: "PartitionPlan") -> "ActivationPlan":
        """``none | full | selective | stage_aware`` (the ``recompute`` training argument) for the
        stages of ``sharding_plan``, without a memory budget.

        ``stage_aware`` turns Merak's fixed rule (:meth:`RecomputePlan.stage_aware`: kept share of
        stage ``s`` ∝ ``1/(P-1-s)``, last stage keeps all) into a whole number of layers per stage,
        the nearest to the rule's fraction, and recomputes the stage's *earliest* layers: their
        inputs are the first to be needed again, so a stage that cannot recompute everything
        still frees the activations that wait longest. That rule is 1F1B's (one stage per rank);
        for the ``P·v`` chunks of a virtual-stage schedule build the plan with
        :meth:`from_fractions` from :func:`merak.runtime.memory.stage_aware.stage_aware_plan`.
        """
        layers = stage_layers(sharding_plan)
        p = len(layers)
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"unknown recompute mode {mode!r}; choose one of {RECOMPUTE_MODES}")
        if mode == "none":
            return cls(tuple({} for _ in layers), layers)
        if mode in ("full", "selective"):
            action = LayerAction.RECOMPUTE if mode == "full" else LayerAction.SELECTIVE
            return cls(tuple({name: action for name in names} for names in layers), layers)
        return cls.from_fractions(sharding_plan, RecomputePlan.stage_aware(p).fractions)

    @classmethod
    def from_fractions(cls, sharding_plan: "PartitionPlan", fractions: Sequence[float]) -> "ActivationPlan":
        """Recompute, on each stage of ``sharding_plan``, the whole number of layers nearest to
        ``fractions[stage]`` of them, the stage's earliest first (see :meth:`from_mode`); with
        virtual stages, one fraction per virtual stage (``stage_aware.virtual_stage_fractions``)."""
        layers = stage_layers(sharding_plan)
        if len(fractions) != len(layers):
            raise ValueError(f"{len(fractions)} recompute fractions for {len(layers)} stages")
        stages = []
        for names, fraction in zip(layers, fractions):
            count = min(len(names), math.floor(fraction * len(names) + 0.5))
            stages.append({name: LayerAction.RECOMPUTE for name in names[:count]})
        return cls(tuple(stages), layers)

    @classmethod
    def uniform(cls, layers: Sequence[Sequence[str]], action: LayerAction | str) -> "ActivationPlan":
        """Every layer of every stage gets ``action`` (e.g. an all-offload plan)."""
        action = LayerAction(action)
        names = tuple(tuple(n) for n in layers)
        return cls(tuple({name: action for name in n} for n in names), names)
