"""Automatic tensor parallelism for pipeline stages (Megatron-style, with sub-pipelined TP).

Usage (what :class:`merak.MerakTrainer` does when ``tp > 1``)::

    graph = trace(model, example)                          # merak.partitioner
    plan = plan_tensor_parallel(graph, tp=grid.dims.tp)    # column/row pairs, vocab-parallel head
    stage = build_stage(shard(graph, pp), grid.stage_id)
    apply_tensor_parallel(stage, grid, plan, sub_microbatches=2)

``print(plan.table())`` (or ``python -m merak.partitioner --config ... --tp N``) shows what was
found. One module per concern:

* :mod:`.plan` - the plan, the search for column -> row regions, the user mapping, errors;
* :mod:`.propagate` - the sharding rules of every op the search follows;
* :mod:`.layers` - communication functions and sharded layers (custom autograd functions);
* :mod:`.apply` - applying a plan to a stage (modules and graph rewrites);
* :mod:`.interleave` - sub-micro-batch interleaving of TP communication;
* :mod:`.export` - gathering full tensors for export and gradient-norm bookkeeping;
* :mod:`.overlap` - the analytic model of the overlap (benchmark, planning).
"""

from merak.runtime.tensor_parallel.apply import apply_tensor_parallel, sharded_parameters
from merak.runtime.tensor_parallel.export import gather_full_state_dict, tp_grad_norm_squared
from merak.runtime.tensor_parallel.layers import ShardSpec, TPGroup, vocab_parallel_cross_entropy
from merak.runtime.tensor_parallel.plan import STYLES, LayerPlan, TPError, TPPlan, plan_tensor_parallel

__all__ = [
    "plan_tensor_parallel",
    "apply_tensor_parallel",
    "gather_full_state_dict",
    "tp_grad_norm_squared",
    "sharded_parameters",
    "vocab_parallel_cross_entropy",
    "TPPlan",
    "LayerPlan",
    "ShardSpec",
    "TPGroup",
    "TPError",
    "STYLES",
]
