"""Does the planner rank layouts the way they really run? Spearman correlation on this CPU.

Why: the planner (``python -m merak.planner``) is only useful if its predicted step times order
layouts as measured ones do - absolute error matters less than picking the right layout. This
benchmark trains a small GPT-2 with ``MerakTrainer`` on 4 gloo ranks (torchrun, one OpenMP thread
per rank) in at least five (dp, tp, pp) layouts with the same global batch, measures the median
step time of each, asks the planner's simulator for its prediction of the same layouts on the
``this-cpu`` cluster preset (calibrated on this machine; 4 ranks sharing the machine's cores),
and reports both rankings and their Spearman rank correlation (target >= 0.8).

Usage (from the repository root)::

    python benchmarks/planner_validation.py [--quick] [--out-dir DIR]

Writes ``planner_validation.md`` and ``planner_validation.png`` (predicted vs measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, ping_pong, save_figure, write_markdown_report  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
REPORT_NAME = "planner_validation"
WORLD = 4
MODEL = {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 1024, "n_positions": 128,
         "bos_token_id": 1023, "eos_token_id": 1023}
SEQ = 128
GLOBAL_BATCH = 16
TARGET = 0.8


@dataclass(frozen=True)
class Layout:
    """One point of the comparison: the 3D layout, micro-batch size and schedule."""

    dp: int
    tp: int
    pp: int
    micro_batch: int
    schedule: str = "1f1b"
    recompute: str = "none"

    @property
    def microbatches(self) -> int:
        """Micro-batches per step and DP replica, so every layout trains GLOBAL_BATCH samples."""
        return GLOBAL_BATCH // (self.dp * self.micro_batch)

    @property
    def label(self) -> str:
        return f"dp{self.dp} tp{self.tp} pp{self.pp} mb{self.micro_batch}"


LAYOUTS = (
    Layout(4, 1, 1, 2), Layout(2, 1, 2, 2), Layout(1, 1, 4, 2), Layout(2, 2, 1, 2),
    Layout(1, 2, 2, 2), Layout(1, 4, 1, 4), Layout(1, 1, 4, 4),
)


# ---- measuring (one torchrun job per layout) --------------------------------------------------

def worker(layout: Layout, steps: int, warmup: int) -> None:
    """Runs on every rank: train ``steps`` steps, rank 0 prints the median step time as JSON."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

    import merak

    merak.init(dp=layout.dp, tp=layout.tp, pp=layout.pp)
    torch.manual_seed(0)
    config = GPT2Config(**MODEL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(1)
    samples = GLOBAL_BATCH * (steps + warmup)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, MODEL["vocab_size"], (samples, SEQ), generator=gen)]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, *args: object, **kwargs: object) -> None:
            self._start = time.perf_counter()

        def on_step_end(self, *args: object, **kwargs: object) -> None:
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimer()
    args = merak.MerakArguments(
        output_dir="/tmp/merak-planner-validation", per_device_train_batch_size=layout.micro_batch,
        gradient_accumulation_steps=layout.microbatches, max_steps=steps + warmup, learning_rate=1e-4,
        schedule=layout.schedule, recompute=layout.recompute, report_to="none", save_strategy="no",
        logging_steps=10_000, disable_tqdm=True, seed=0)
    trainer = merak.MerakTrainer(model, args, train_dataset=data, callbacks=[timer])
    trainer.train()
    if merak.get_grid().rank == 0:
        print("RESULT " + json.dumps({"median_step_s": statistics.median(timer.times[warmup:])}), flush=True)


def measure(layout: Layout, steps: int, warmup: int, timeout: float) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(Path(__file__).resolve()), "--worker", json.dumps(asdict(layout)),
           "--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{layout.label} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return float(json.loads(lines[-1][len("RESULT "):])["median_step_s"])


def link_worker() -> None:
    """Runs on 2 gloo ranks: rank 0 prints the p2p latency and bandwidth (what the planner's CPU
    'cluster' uses for p2p and all-reduce), from round trips of a tiny and a 4 MiB message."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    bytes_per_s, latency = ping_pong(dist.get_rank(), 4 << 20)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"latency_s": latency, "bytes_per_s": bytes_per_s}), flush=True)
    dist.destroy_process_group()


def _torchrun(nprocs: int, args: list[str], timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
           str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"`{' '.join(args)}` failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ---- predicting ---------------------------------------------------------------------------------

def predict_all(layouts: list[Layout], cluster) -> list[float]:
    from merak.planner.simulator import Strategy, TracedModel, predict

    spec = ["gpt2", *(f"{k}={v}" for k, v in MODEL.items())]
    model = TracedModel.from_config(spec, seq_len=SEQ, label="gpt2-small-validation")
    return [predict(model, Strategy(dp=l.dp, tp=l.tp, pp=l.pp, micro_batch=l.micro_batch, schedule=l.schedule,
                                    recompute=l.recompute), GLOBAL_BATCH, cluster).step_seconds
            for l in layouts]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2.0
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


# ---- report -------------------------------------------------------------------------------------

def plot(layouts: list[Layout], predicted: list[float], measured: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(predicted, measured)
    for layout, x, y in zip(layouts, predicted, measured):
        ax.annotate(layout.label, (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    low, high = min(predicted + measured), max(predicted + measured)
    ax.plot([low, high], [low, high], linestyle="--", linewidth=0.8, color="grey", label="predicted = measured")
    ax.set_xlabel("predicted step time (s)")
    ax.set_ylabel("measured step time (s)")
    ax.set_title(f"Planner vs measurement, {WORLD} gloo ranks on this CPU", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 layouts, 1 warm-up + 2 timed steps (smoke run)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per measured layout")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--link-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = args.steps or (2 if args.quick else 6)
    warmup = args.warmup or (1 if args.quick else 2)
    if args.link_worker:
        link_worker()
        return 0
    if args.worker:
        worker(Layout(**json.loads(args.worker)), steps, warmup)
        return 0
    layouts = list(LAYOUTS[:5] if args.quick else LAYOUTS)
    link = _torchrun(2, ["--link-worker"], args.timeout)
    from merak.auto_parallel import local_cluster
    from merak.planner.cluster import Link

    # The same description of this machine that MerakArguments(auto_parallel=True) plans with,
    # with the gloo link measured just now.
    cluster = local_cluster(WORLD, WORLD, cpu_link=Link(link["bytes_per_s"], link["latency_s"]))
    predicted = predict_all(layouts, cluster)
    measured = []
    for layout in layouts:
        measured.append(_torchrun(WORLD, ["--worker", json.dumps(asdict(layout)), "--steps", str(steps),
                                          "--warmup", str(warmup)], args.timeout)["median_step_s"])
        print(f"{layout.label}: predicted {predicted[len(measured) - 1]:.3f}s, measured {measured[-1]:.3f}s",
              flush=True)
    rho = spearman(predicted, measured)
    pred_rank = sorted(range(len(layouts)), key=predicted.__getitem__)
    meas_rank = sorted(range(len(layouts)), key=measured.__getitem__)
    rows = [[l.label, l.schedule, l.microbatches, f"{pr:.3f}", f"{me:.3f}", f"{(pr - me) / me * 100:+.0f}%",
             pred_rank.index(i) + 1, meas_rank.index(i) + 1]
            for i, (l, pr, me) in enumerate(zip(layouts, predicted, measured))]
    png = f"{REPORT_NAME}.png"
    plot(layouts, predicted, measured, args.out_dir / png)
    verdict = "met" if rho >= TARGET else "MISSED"
    body = "\n".join([
        f"Small GPT-2 ({', '.join(f'{k}={v}' for k, v in MODEL.items())}, seq {SEQ}) trained with `MerakTrainer` "
        f"on {WORLD} gloo ranks (torchrun, one OpenMP thread per rank, {os.cpu_count()} cores: ranks share "
        f"cores), global batch {GLOBAL_BATCH} sequences per step, AdamW; median of {steps} timed steps after "
        f"{warmup} warm-up. Predicted by `merak.planner.simulator.predict` on this machine as a one-node "
        f"cluster: GEMM curve, memory bandwidth and per-op overhead calibrated here "
        f"(`calibrate_device`), each rank given {min(1.0, (os.cpu_count() or 1) / WORLD):.2f} of a core, "
        f"gloo link measured here: latency {link['latency_s'] * 1e6:.0f} us, "
        f"{link['bytes_per_s'] / 1e9:.2f} GB/s.",
        "",
        markdown_table(["layout", "schedule", "micro-batches", "predicted s", "measured s", "error",
                        "predicted rank", "measured rank"], rows),
        "",
        f"**Spearman rank correlation: {rho:.2f}** (target >= {TARGET}: {verdict}) over {len(layouts)} layouts"
        + (" — `--quick` run: too few steps to quote." if args.quick else "."),
        "",
        f"![predicted vs measured]({png})",
    ])
    write_markdown_report(args.out_dir / f"{REPORT_NAME}.md", "Planner validation: predicted vs measured ranking",
                          body, packages=("torch", "transformers"))
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
