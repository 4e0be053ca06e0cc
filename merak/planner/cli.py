"""``python -m merak.planner``: which layout to rent before renting it.

Why: choosing dp x tp x pp, the micro-batch, the schedule, recomputation and TP sub-micro-batches
by trial on 64 GPUs is expensive; the cluster simulator (:mod:`merak.planner.simulator`)
predicts each choice from the model's traced graph (on meta: no weights), the real partitioner,
the real schedules and the memory estimator. This command searches them all
(:func:`merak.planner.search.search`), refuses every layout whose estimated memory exceeds
the device, and prints the five fastest with predicted step time, throughput, peak memory and MFU.

Examples::

    python -m merak.planner --config gpt2 n_layer=48 n_embd=1600 n_head=25 --gpus 64 --gpu-memory 80GB \\
        --global-batch 512 --seq 1024
    python -m merak.planner --config llama num_hidden_layers=32 hidden_size=4096 intermediate_size=11008 \\
        num_attention_heads=32 vocab_size=32000 --gpus 16 --device h100-80gb --global-batch 256 --seq 4096 --json

``MerakArguments(auto_parallel=True)`` runs the same search at start-up for the launched job.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence

from merak.planner.cluster import DEVICE_PRESETS, Cluster, cluster_preset, parse_bytes
from merak.planner.search import SearchResult, SearchSpace, search
from merak.planner.simulator import RECOMPUTE_CHOICES, TracedModel
from merak.runtime.pipeline.schedule import SCHEDULES

__all__ = ["main", "plan"]

logger = logging.getLogger("merak")


def build_cluster(device: str, gpus: int, gpus_per_node: int, gpu_memory: str | None) -> Cluster:
    """``gpus`` devices of preset ``device`` in nodes of ``gpus_per_node``; ``gpu_memory``
    (e.g. ``"40GB"``) replaces the preset's capacity."""
    if gpus < 1 or gpus_per_node < 1:
        raise ValueError(f"--gpus and --gpus-per-node must be >= 1, got {gpus} and {gpus_per_node}")
    per_node = min(gpus, gpus_per_node)
    if gpus % per_node:
        raise ValueError(f"--gpus {gpus} is not a whole number of nodes of {per_node}; use a multiple of "
                         f"{per_node} or set --gpus-per-node")
    cluster = cluster_preset(device, gpus // per_node, per_node)
    if gpu_memory:
        cluster = dataclasses.replace(cluster, device=dataclasses.replace(cluster.device, hbm_bytes=parse_bytes(gpu_memory)))
    return cluster


def plan(model: TracedModel, cluster: Cluster, global_batch: int, space: SearchSpace = SearchSpace(),
         top: int = 5) -> SearchResult:
    """The ``top`` fastest strategies that fit (fastest first); raises ``ValueError`` naming
    what to change when none fits.

    Strategies that differ only in choices with no effect (a schedule or recomputation mode on a
    single stage, where nothing is in flight) predict identical numbers; only the first of such
    a group is listed, so the ranking shows ``top`` genuinely different options."""
    result = search(model, cluster, global_batch, space, keep=top * 6)
    seen: set[tuple] = set()
    distinct = []
    for p in result.best:
        s = p.strategy
        key = (s.dp, s.tp, s.pp, s.micro_batch, s.tp_sub_microbatches, round(p.step_seconds, 9),
               round(p.peak_memory_bytes))
        if key not in seen:
            seen.add(key)
            distinct.append(p)
    result = dataclasses.replace(result, best=tuple(distinct[:top]))
    if not result.best:
        why = f" (e.g. {result.invalid[0]})" if result.invalid and not result.refused_memory else ""
        raise ValueError(
            f"no layout of {model.label} on {cluster.num_devices} x {cluster.device.name} fits "
            f"{cluster.device.usable_bytes / 2**30:.1f} GiB usable per device for a global batch of {global_batch}: "
            f"{result.candidates} candidates, {result.refused_memory} over memory{why}. Use more GPUs or GPUs "
            f"with more memory, a smaller --global-batch or --seq, or allow recomputation (--recompute full)")
    return result


def format_table(result: SearchResult, cluster: Cluster) -> str:
    """The ranking as a readable table."""
    head = ("rank", "dp", "tp", "pp", "micro", "M", "schedule", "recompute", "k", "step s", "samples/s",
            "peak GiB", "MFU", "bubble")
    rows = []
    for i, p in enumerate(result.best, 1):
        s = p.strategy
        rows.append((str(i), str(s.dp), str(s.tp), str(s.pp), str(s.micro_batch), str(p.microbatches), s.schedule,
                     s.recompute, str(s.tp_sub_microbatches), f"{p.step_seconds:.3f}", f"{p.samples_per_second:.1f}",
                     f"{p.peak_memory_bytes / 2**30:.1f}", f"{p.mfu * 100:.1f}%", f"{p.bubble_ratio:.3f}"))
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    out.append(f"{result.candidates} candidates: {result.refused_memory} refused (over "
               f"{cluster.device.usable_bytes / 2**30:.1f} GiB usable per device), {result.pruned} pruned by the "
               f"lower bound, {len(result.invalid)} invalid")
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m merak.planner",
                                description="Search dp x tp x pp, micro-batch, schedule, recomputation and TP "
                                            "sub-micro-batches with Merak's cluster simulator.")
    p.add_argument("--config", nargs="+", required=True, metavar="CONFIG",
                   help="model_type (or a config.json path) and key=value overrides, as for python -m merak.partitioner")
    p.add_argument("--gpus", type=int, required=True, help="number of devices")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="memory per device, e.g. 80GB (default: the preset's)")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's context, at most 2048)")
    p.add_argument("--device", default="a100-80gb", choices=sorted(DEVICE_PRESETS), help="device preset (default a100-80gb)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="devices per node (default 8; tp stays within a node)")
    p.add_argument("--schedules", nargs="+", default=list(SearchSpace.schedules), choices=SCHEDULES)
    p.add_argument("--recompute", nargs="+", default=list(SearchSpace.recomputes), choices=RECOMPUTE_CHOICES)
    p.add_argument("--micro-batches", nargs="+", type=int, default=list(SearchSpace.micro_batches), metavar="B")
    p.add_argument("--top", type=int, default=5, help="how many layouts to print (default 5)")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        cluster = build_cluster(args.device, args.gpus, args.gpus_per_node, args.gpu_memory)
        model = TracedModel.from_config(args.config, seq_len=args.seq)
        space = SearchSpace(schedules=tuple(args.schedules), recomputes=tuple(args.recompute),
                            micro_batches=tuple(args.micro_batches))
        result = plan(model, cluster, args.global_batch, space, args.top)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"model": model.label, "parameters": model.parameters, "cluster": cluster.describe(),
                          "global_batch": args.global_batch, "seq_len": model.seq_len, "seconds": seconds,
                          "candidates": result.candidates, "refused_memory": result.refused_memory,
                          "top": [p.to_json() for p in result.best]}, indent=2))
    else:
        print(f"{model.label}: {model.parameters / 1e9:.2f}B parameters, seq {model.seq_len}, global batch "
              f"{args.global_batch}\n{cluster.describe()}\nsearched in {seconds:.1f}s\n")
        print(format_table(result, cluster))
    return 0

