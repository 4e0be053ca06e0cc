"""Cost model: how long a node takes, forward and backward.

Why one replaceable object: the partitioner only needs a number per node, and where that number
comes from will change - today an analytical model from FLOPs and bytes, later measured times
from a profiler. Anything with a ``node_cost(ProxyNode) -> NodeCost`` method can be passed as
``shard(..., cost_model=...)``.

The default :class:`FlopCostModel` is a roofline: a node takes ``flops / peak_flops`` plus
``bytes moved / memory bandwidth`` (matmul-like ops are dominated by the first term, elementwise
ops, norms and softmax by the second). Backward costs ``backward_factor`` x forward (2x: one
matmul for the input gradient and one for the weight gradient), and nothing for nodes whose
output does not require grad (masks, position ids), since autograd never visits them.

A cut may also cost ``transfer_cost(bytes)``: the time the stages on both sides spend moving the
crossing activations forward and their gradients back. It is off by default (the link is not
known when planning, and within a node it is nearly free); with ``link_bytes_per_second`` set the
partitioner trades balance for cheap cuts, e.g. on slow inter-node links. Absolute seconds only
matter for reporting; balance depends on the ratios.
"""

from __future__ import annotations

import abc
import dataclasses

from .proxy_graph import ProxyNode

__all__ = ["NodeCost", "CostModel", "FlopCostModel"]


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """Estimated seconds of one node for one micro-batch."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


class CostModel(abc.ABC):
    """Maps a :class:`ProxyNode` to its forward and backward time."""

    name: str = "cost"

    @abc.abstractmethod
    def node_cost(self, node: ProxyNode) -> NodeCost:
        """Forward and backward seconds of ``node``."""

    def transfer_cost(self, nbytes: int) -> float:
        """Seconds a cut keeps each neighbouring stage busy moving ``nbytes`` (activations forward
        plus their gradients back). Free unless a model says otherwise."""
        return 0.0

    def describe(self) -> str:
        return type(self).__name__


@dataclasses.dataclass(frozen=True)
class FlopCostModel(CostModel):
    """Roofline cost from FlopCounterMode FLOPs and bytes moved (see the module docstring).

    Defaults are those of an A100-class accelerator in bf16 (312 TFLOP/s peak at 60% efficiency,
    2 TB/s at 75%); only the ratios affect partitioning. ``link_bytes_per_second`` (e.g. 25e9 for
    an InfiniBand HDR port) makes cuts cost their transfer time; ``None`` leaves them free.
    """

    flops_per_second: float = 312e12 * 0.6
    bytes_per_second: float = 2.0e12 * 0.75
    backward_factor: float = 2.0
    link_bytes_per_second: float | None = None

    def node_cost(self, node: ProxyNode) -> NodeCost:
        forward = node.flops / self.flops_per_second + node.memory_bytes / self.bytes_per_second
        backward = self.backward_factor * forward if node.requires_grad else 0.0
        return NodeCost(forward, backward)

    def transfer_cost(self, nbytes: int) -> float:
        return nbytes / self.link_bytes_per_second if self.link_bytes_per_second else 0.0

    def describe(self) -> str:
        link = f", links {self.link_bytes_per_second / 1e9:g} GB/s" if self.link_bytes_per_second else ""
        return (f"FlopCostModel({self.flops_per_second / 1e12:.0f} TFLOP/s, "
                f"{self.bytes_per_second / 1e12:.2f} TB/s, backward {self.backward_factor:g}x{link})")
