"""Partition balance of Merak's cost-based sharding vs DeepSpeed-style methods, on big configs.

Why: a pipeline runs at the pace of its slowest stage, so the figure of merit of a partition is
its imbalance, max/mean stage time. Every method is scored with the *same* cost model (FLOPs and
bytes from FlopCounterMode on meta tensors, backward = 2x forward), so the comparison isolates
where the cuts go: ``cost`` (min-max at sub-layer granularity), ``parameters`` (balance parameter
counts at layer starts) and ``uniform`` (equal layer counts; embeddings with the first stage, head
with the last) as DeepSpeed does. Models are built on the meta device from their configs: no
weights, no downloads.

Each model is planned in a fresh subprocess so plan time and peak RSS are its own (the figure
for the 20B model is what ``python -m merak.partitioner`` costs).

Usage (from the repository root)::

    python benchmarks/partition_balance.py [--models gpt2-xl,llama2-7b,...] [--stages 4,8,16]
    python benchmarks/partition_balance.py --quick      # GPT-2 XL at 4 and 8 stages (CI smoke run)

Writes ``benchmarks/results/partition_balance.md`` and ``partition_balance.png`` (imbalance per
method, one group of bars per model and stage count).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, save_figure, write_markdown_report  # noqa: E402

REPORT_NAME = "partition_balance"

MODELS: dict[str, list[str]] = {
    "gpt2-xl": ["gpt2", "n_layer=48", "n_embd=1600", "n_head=25"],
    "llama2-7b": ["llama", "num_hidden_layers=32", "hidden_size=4096", "intermediate_size=11008",
                  "num_attention_heads=32", "vocab_size=32000"],
    "llama2-13b": ["llama", "num_hidden_layers=40", "hidden_size=5120", "intermediate_size=13824",
                   "num_attention_heads=40", "vocab_size=32000"],
    "gpt-neox-20b": ["gpt_neox", "num_hidden_layers=44", "hidden_size=6144", "intermediate_size=24576",
                     "num_attention_heads=64", "vocab_size=50432"],
}
METHODS = ("cost", "parameters", "uniform")
TARGETS = {8: 1.05, 16: 1.10}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def worker(name: str, stages: list[int]) -> dict:
    """Build, trace and shard one model; runs in its own process."""
    from merak.partitioner import shard, trace
    from merak.partitioner.configs import build_model, example_inputs, load_config

    start, cpu_start = time.perf_counter(), time.process_time()
    model = build_model(load_config(MODELS[name]))
    inputs = example_inputs(model)
    graph = trace(model, inputs)
    traced, traced_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    plans = {}
    for k in stages:
        for method in METHODS:
            t0, c0 = time.perf_counter(), time.process_time()
            plan = shard(graph, k, method=method)
            plans[f"{k}/{method}"] = {"imbalance": plan.imbalance, "seconds": time.perf_counter() - t0,
                                      "cpu_seconds": time.process_time() - c0}
    return {
        "model": name,
        "class": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "layers": len(graph.layers),
        "seq_len": int(inputs["input_ids"].shape[1]),
        "nodes": len(graph.compute_nodes),
        "flavour": graph.flavour,
        "trace_seconds": traced,
        "trace_cpu_seconds": traced_cpu,
        "plans": plans,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_worker(name: str, stages: list[int]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", name, "--stages", ",".join(map(str, stages))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(results: list[dict], stages: list[int]) -> str:
    rows = []
    for r in results:
        for k in stages:
            imb = {m: r["plans"][f"{k}/{m}"]["imbalance"] for m in METHODS}
            target = TARGETS.get(k)
            verdict = "" if target is None else ("met" if imb["cost"] <= target else "MISSED") + f" (<= {target})"
            plan_s = r["trace_seconds"] + r["plans"][f"{k}/cost"]["seconds"]
            plan_cpu = r["trace_cpu_seconds"] + r["plans"][f"{k}/cost"]["cpu_seconds"]
            rows.append([r["model"], k, f"{imb['cost']:.3f}", f"{imb['parameters']:.3f}", f"{imb['uniform']:.3f}",
                         verdict, f"{plan_s:.1f}", f"{plan_cpu:.1f}", f"{r['peak_rss_bytes'] / 2**30:.2f}"])
    models = [[r["model"], r["class"], f"{r['params'] / 1e9:.2f}B", r["layers"], r["seq_len"], r["nodes"],
               r["flavour"]] for r in results]
    return "\n".join([
        "Imbalance = max/mean stage time from the same cost model (FlopCostModel: FLOPs and bytes from",
        "FlopCounterMode on meta tensors, backward 2x forward), micro-batch 1 at the model's context",
        "length (at most 2048). `cost` = Merak's min-max cut at node granularity; `parameters` and",
        "`uniform` = DeepSpeed-style cuts at layer starts. Plan time = build on meta + trace + cost +",
        "shard (`cost`), in a fresh process, wall and CPU seconds (the machine is shared, so wall",
        "time includes waiting for a core); peak RSS of that process (all 9 plans of the model).",
        "",
        markdown_table(["model", "stages", "cost", "parameters", "uniform", "target (cost)", "plan wall s",
                        "plan CPU s", "peak RSS GiB"], rows),
        "",
        markdown_table(["model", "class", "params", "layers", "seq", "compute nodes", "traced with"], models),
    ])


def plot(results: list[dict], stages: list[int], path: Path) -> None:
    """Grouped bars: imbalance of each method for every (model, stages) pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(r, k) for r in results for k in stages]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.5))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        values = [r["plans"][f"{k}/{method}"]["imbalance"] for r, k in groups]
        ax.bar([g + (i - (len(METHODS) - 1) / 2) * width for g in range(len(groups))], values, width,
               label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), [f"{r['model']}\n{k} stages" for r, k in groups], fontsize=8)
    ax.set_ylabel("imbalance (max / mean stage cost)")
    ax.set_ylim(bottom=0.95)
    ax.set_title("Partition balance per method (lower is better, 1.0 = perfect)", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--stages", default=None, help="comma-separated stage counts (default 4,8,16)")
    p.add_argument("--quick", action="store_true", help="GPT-2 XL at 4 and 8 stages only (smoke run)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the .md and .png go")
    args = p.parse_args(argv)
    models = args.models or ("gpt2-xl" if args.quick else ",".join(MODELS))
    stages = [int(s) for s in (args.stages or ("4,8" if args.quick else "4,8,16")).split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, stages)))
        return 0
    results = []
    for name in models.split(","):
        results.append(run_worker(name, stages))
        print(f"{name}: traced in {results[-1]['trace_seconds']:.1f}s", file=sys.stderr)
    plot(results, stages, args.out_dir / f"{REPORT_NAME}.png")
    body = report(results, stages) + f"\n\n![imbalance per method]({REPORT_NAME}.png)\n"
    write_markdown_report(args.out_dir / f"{REPORT_NAME}.md", "Partition balance: cost vs parameters vs uniform",
                          body, packages=("torch", "transformers"))
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
