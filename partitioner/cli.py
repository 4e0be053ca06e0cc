"""``python -m merak.partitioner``: print a partition plan for a model described by its config.

Why a CLI: choosing the number of pipeline stages (and checking that a model splits evenly)
should not need a cluster, weights, or a line of code. The model is built on the meta device,
traced, costed and sharded; the text output is a table, ``--json`` prints the plan as JSON
(keys ``stages``, ``imbalance``, ``method``, ``seconds``, ...).

Example::

    python -m merak.partitioner --config gpt2 n_layer=48 n_embd=1600 n_head=25 --stages 8
    python -m merak.partitioner --config llama num_key_value_heads=8 --stages 4 --tp 8   # + TP plan
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from .configs import build_model, example_inputs, load_config
from .cost_model import FlopCostModel
from .proxy_graph import trace
from .sharding import METHODS, PartitionPlan, shard

__all__ = ["main", "plan_from_config"]


def plan_from_config(spec: Sequence[str], stages: int, method: str = "cost", batch_size: int = 1,
                     seq_len: int | None = None, manual_cuts: Sequence[str] | None = None,
                     flavour: str = "auto", link_gbps: float | None = None) -> PartitionPlan:
    """Build, trace and shard the model of ``spec``; ``plan.seconds`` covers all of it."""
    start = time.perf_counter()
    config = load_config(spec)
    model = build_model(config)
    graph = trace(model, example_inputs(model, batch_size, seq_len), flavour=flavour)
    cost_model = FlopCostModel(link_bytes_per_second=link_gbps * 1e9 if link_gbps else None)
    plan = shard(graph, stages, method=method, cost_model=cost_model, manual_cuts=manual_cuts)
    plan.seconds = time.perf_counter() - start
    return plan


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m merak.partitioner",
        description="Partition a model (described by its Hugging Face config) into pipeline stages.",
    )
    p.add_argument("--config", nargs="+", required=True, metavar="CONFIG",
                   help="a config.json path or a model_type, followed by key=value overrides, "
                        "e.g. 'gpt2 n_layer=48 n_embd=1600 n_head=25'")
    p.add_argument("--stages", type=int, required=True, help="number of pipeline stages")
    p.add_argument("--method", choices=METHODS, default="cost", help="partitioning method (default: cost)")
    p.add_argument("--manual-cuts", nargs="+", default=None, metavar="NAME",
                   help="with --method manual: module or node names where stages 1..N-1 begin")
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch size used for costs (default 1)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length used for costs (default: the model's context, at most 2048)")
    p.add_argument("--flavour", choices=("auto", "fx", "export"), default="auto", help="tracing path")
    p.add_argument("--link-gbps", type=float, default=None, metavar="GB/s",
                   help="price each cut at its activation+gradient bytes over this link bandwidth "
                        "(default: cuts are free, traffic only breaks ties)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="also print the automatic tensor-parallel plan for N ranks (column/row pairs, "
                        "vocab-parallel head; errors name sizes not divisible by N)")
    p.add_argument("--tp-mapping", nargs="+", default=None, metavar="PATTERN=STYLE",
                   help="with --tp: overrides of the automatic plan, e.g. '*.c_attn=column' '*.mlp.*=replicate'")
    p.add_argument("--moe", choices=("tensor", "expert"), default="tensor",
                   help="with --tp: shard mixture-of-experts banks inside each expert (tensor) or spread "
                        "whole experts over the tp ranks (expert)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        plan = plan_from_config(args.config, args.stages, args.method, args.batch_size, args.seq_len,
                                args.manual_cuts, args.flavour, args.link_gbps)
        tp_plan = None
        if args.tp > 1 or args.tp_mapping:
            from merak.runtime.tensor_parallel import plan_tensor_parallel

            tp_plan = plan_tensor_parallel(plan.graph, args.tp, args.tp_mapping, args.moe)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = plan.to_json()
        if tp_plan is not None:
            out["tensor_parallel"] = tp_plan.to_json()
        print(json.dumps(out, indent=2))
    else:
        print(plan.table())
        if tp_plan is not None:
            print()
            print(tp_plan.table())
    return 0
