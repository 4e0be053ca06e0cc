"""What happens to each layer's saved activations between its forward and its backward.

Why a per-layer choice: activation memory is spent layer by layer, and the pipeline stages differ
in how many micro-batches they hold in flight (stage ``s`` of a ``P``-stage 1F1B holds up to
``P - s``). A stage that is short of memory recomputes or offloads some layers; a stage with
idle memory keeps them. :class:`ActivationPlan` is the value object that the memory planner
(``merak.runtime.memory``) produces, the executor applies, and the schedules/simulator read
(through :meth:`ActivationPlan.recompute_plan`).

Actions per layer (layers are the repeated blocks the partitioner found, e.g.
``transformer.h.3``; nodes outside any layer - embeddings, final norm, head - are always kept):

* ``keep``       - autograd saves what it saves (fastest, most memory),
* ``recompute``  - only the layer's inputs are saved; the layer is re-run before its backward,
* ``selective``  - like Megatron's selective recomputation: only the attention core
  (scores, softmax, dropout, attention x values) is recomputed, the rest is kept,
* ``offload``    - saved tensors are moved to host memory and back
  (``torch.autograd.graph.save_on_cpu``), paying link time instead of compute.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class LayerAction(str, enum.Enum):
    """What one layer does with its saved activations (see the module docstring)."""

    KEEP = "keep"
    RECOMPUTE = "recompute"
    SELECTIVE = "selective"
    OFFLOAD = "offload"


@dataclass(frozen=True)
class ActivationPlan:
    """Per pipeline stage, the action of each of its layers; layers not named are kept."""

    stages: tuple[Mapping[str, LayerAction], ...]

    def actions(self, stage: int) -> dict[str, LayerAction]:
        """``{layer name: action}`` of ``stage`` (only layers whose action is not ``keep``)."""
        return {name: LayerAction(a) for name, a in self.stages[stage].items() if LayerAction(a) is not LayerAction.KEEP}

    @property
    def num_stages(self) -> int:
        return len(self.stages)
