"""Merak's automatic partitioner: trace on meta, cost every node, cut into balanced stages.

Pipeline: :func:`trace` (fx tracer carrying meta values; ``torch.export`` fallback) ->
:class:`ProxyGraph` (FLOPs / bytes / tensor metadata per node) -> :func:`shard` with a
:class:`CostModel` -> :class:`PartitionPlan` -> :func:`build_stage` -> :class:`StageModule`.
One module per concern: ``meta`` (weightless models, materialization), ``tracer``,
``proxy_graph``, ``cost_model``, ``sharding``, ``stage``, ``configs`` and ``cli``.
"""

from .cost_model import CostModel, FlopCostModel, NodeCost
from .meta import init_empty_weights
from .proxy_graph import ProxyGraph, ProxyNode, TensorMeta, trace
from .sharding import METHODS, PartitionPlan, StageStats, shard
from .stage import StageChunks, StageModule, build_chunks, build_stage, run_sequentially
from .tracer import TraceError

__all__ = [
    "trace",
    "shard",
    "StageChunks",
    "build_chunks",
    "build_stage",
    "init_empty_weights",
    "ProxyGraph",
    "ProxyNode",
    "TensorMeta",
    "PartitionPlan",
    "StageStats",
    "StageModule",
    "run_sequentially",
    "CostModel",
    "FlopCostModel",
    "NodeCost",
    "TraceError",
    "METHODS",
]
