"""Speed-up of Merak's virtual-stage schedules over Merak 1F1B, measured *paired* (pp=2, CPU).

The question this benchmark answers - "is ``zb_v`` / ``interleaved_1f1b`` at least 1.05x Merak's
1F1B?" - is a ratio of a few per cent, and on this shared 2-core VM a step's time moves by
±10-15 % from one second to the next (other guests share the host). Separate jobs, as
:mod:`benchmarks.pipeline_throughput` runs them, sample different minutes of that drift, so
their ratio carries it. Here one job (2 ranks, ``torchrun``) builds every schedule's pipeline
side by side - each its own seeded copy of the same model, cut, calibrated and optimised as in
:mod:`benchmarks.peers.merak_runners` - and alternates them step by step on the same batches,
rotating which goes first. Each step's ratio compares steps a second apart; a round's figure is
the median of its paired ratios (and, beside it, the ratio of median step times).

    python benchmarks/schedule_speedup.py                 # 3 rounds x 10 timed steps each
    python benchmarks/schedule_speedup.py --quick         # 1 round, 1 warm-up + 2 timed steps
    python benchmarks/schedule_speedup.py --schedules interleaved_1f1b --set num_microbatches=16

Every schedule trains the same model on the same batches, so their step losses must agree
(within the fp32 reordering drift of :data:`LOSS_DRIFT_ATOL`); a run where they do not exits 1.
The same file is the per-rank worker (``--worker``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_model import BenchConfig  # noqa: E402
from benchmarks.common import markdown_table, save_figure, write_markdown_report  # noqa: E402
from benchmarks.pipeline_throughput import (  # noqa: E402
    LOSS_DRIFT_ATOL, PACKAGES, RANK_ENV, REPO_ROOT, RESULTS_DIR, config_from_overrides)

REPORT_NAME = "schedule_speedup"
BASELINE = "1f1b"
DEFAULT_SCHEDULES = ("interleaved_1f1b", "zb_v")
#: The issue's bar: each virtual-stage schedule at least this many times Merak 1F1B, every round.
TARGET = 1.05


# --------------------------------------------------------------------------------------------
# Worker side (runs inside each of the 2 ranks)
# --------------------------------------------------------------------------------------------


def worker_main(entries: list[str], cfg: BenchConfig, result_dir: Path) -> None:
    """Build every entry's pipeline, then alternate their steps; write ``rank<N>.json``."""
    import time

    import torch
    import torch.distributed as dist

    import merak
    from benchmarks.peers import BenchContext
    from benchmarks.peers.merak_runners import merak_step

    torch.set_num_threads(1)
    ctx = BenchContext.from_env(cfg)
    grid = merak.init(pp=ctx.world_size)
    steps = {entry: merak_step(ctx, entry, grid) for entry in entries}
    times: dict[str, list[float]] = {e: [] for e in entries}
    losses: dict[str, list[float | None]] = {e: [] for e in entries}
    for i, batch in enumerate(ctx.batches()):
        shift = i % len(entries)  # each schedule runs first, second, ... equally often
        for entry in entries[shift:] + entries[:shift]:
            dist.barrier()  # both ranks start the step together: its time is the step's own
            began = time.perf_counter()
            loss = steps[entry](batch)
            times[entry].append(time.perf_counter() - began)
            losses[entry].append(None if loss is None else float(loss))
    (result_dir / f"rank{ctx.rank}.json").write_text(json.dumps({"times": times, "losses": losses}))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    """One job's timed steps: per entry, each step's time (the slower rank's) and losses."""

    times: dict[str, list[float]]
    losses: dict[str, list[float]]

    def ratios(self, entry: str) -> list[float]:
        """Per step: 1F1B's time over ``entry``'s (> 1: ``entry`` is faster), steps paired."""
        return [b / t for b, t in zip(self.times[BASELINE], self.times[entry])]

    def paired(self, entry: str) -> float:
        return statistics.median(self.ratios(entry))

    def of_medians(self, entry: str) -> float:
        return statistics.median(self.times[BASELINE]) / statistics.median(self.times[entry])

    def samples_per_s(self, entry: str, samples: int) -> float:
        return samples / statistics.median(self.times[entry])

    def loss_drift(self, entry: str) -> float:
        return max(abs(a - b) for a, b in zip(self.losses[entry], self.losses[BASELINE]))


def run_round(entries: list[str], cfg: BenchConfig, timeout: float, log: Path) -> Round:
    """One ``torchrun`` job of 2 ranks running every entry alternately."""
    script = os.path.relpath(__file__, REPO_ROOT)
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | RANK_ENV | {"PYTHONPATH": pythonpath}
    with tempfile.TemporaryDirectory(prefix="bench-speedup-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.num_stages}",
               script, "--worker", ",".join(entries),
               "--config", cfg.to_json(), "--result-dir", tmp]
        print(f"{' '.join(cmd[3:7])} ... (log: {log})", flush=True)
        with log.open("w") as out:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"the paired job failed (exit {proc.returncode}); see {log}")
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    skip = cfg.warmup_steps
    times = {e: [max(r["times"][e][i] for r in ranks) for i in range(skip, len(ranks[0]["times"][e]))]
             for e in entries}
    losses = {e: next(r["losses"][e] for r in ranks if r["losses"][e][0] is not None) for e in entries}
    return Round(times, losses)


def report(rounds: list[Round], entries: list[str], cfg: BenchConfig, png: Path) -> tuple[str, bool]:
    """The markdown body, and whether every entry's losses agree with 1F1B's."""
    samples = cfg.samples_per_step
    others = [e for e in entries if e != BASELINE]
    rows, agree = [], True
    for entry in others:
        drift = max(r.loss_drift(entry) for r in rounds)
        agree &= drift <= LOSS_DRIFT_ATOL
        paired = [r.paired(entry) for r in rounds]
        rows.append([f"`{entry}`", *(f"{p:.3f}" for p in paired),
                     "yes" if min(paired) >= TARGET else "**no**",
                     ", ".join(f"{r.of_medians(entry):.3f}" for r in rounds), f"{drift:.1e}"])
    heads = ["schedule", *(f"round {i + 1}" for i in range(len(rounds))), f">= {TARGET}x every round",
             "ratio of median step times per round", "max |Δloss| vs 1F1B"]
    speed = [[f"`{e}`", *(f"{r.samples_per_s(e, samples):.2f}" for r in rounds)] for e in entries]
    body = [
        f"Paired ratio to Merak `{BASELINE}` per round (median over the round's steps of 1F1B's step "
        f"time / the schedule's, steps a second apart):", "",
        markdown_table(heads, rows), "",
        "Median samples/s per round (each step's time is the slower rank's):", "",
        markdown_table(["schedule", *(f"round {i + 1}" for i in range(len(rounds)))], speed), "",
        f"Model: `GPT2LMHeadModel`, {cfg.n_layer} blocks, hidden {cfg.n_embd}, seq {cfg.seq_len}, vocab "
        f"{cfg.vocab_size}, fp32, AdamW; micro-batch {cfg.micro_batch}, M = {cfg.num_microbatches}, "
        f"pp = {cfg.num_stages}, "
        f"one OpenMP thread per rank; {cfg.warmup_steps} warm-up step(s) excluded, {cfg.steps} timed steps "
        f"per schedule per round; one job per round, the schedules' steps alternated (order rotated each step).",
        "Each schedule is built as `benchmarks/peers/merak_runners.py` builds it for the throughput "
        "benchmark: automatic cut on profiled node costs, calibrated in dry steps of its own schedule "
        "(virtual schedules: P·v = 4 chunks, 2 per rank).",
    ]
    if _plot(rounds, others, png):
        body += ["", f"![paired ratios per step]({png.name})"]
    return "\n".join(body), agree


def _plot(rounds: list[Round], entries: list[str], png: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for entry in entries:
        ratios = [x for r in rounds for x in r.ratios(entry)]
        ax.plot(range(1, len(ratios) + 1), ratios, marker="o", label=entry)
    per_round = len(rounds[0].times[BASELINE])
    for k in range(1, len(rounds)):
        ax.axvline(k * per_round + 0.5, color="grey", lw=0.5)
    ax.axhline(TARGET, color="red", ls="--", lw=1, label=f"{TARGET}x")
    ax.axhline(1.0, color="black", lw=0.5)
    ax.set_xlabel("timed step (rounds separated by grey lines)")
    ax.set_ylabel("1F1B step time / schedule step time")
    ax.set_title("Paired per-step speed-up over Merak 1F1B (pp=2, CPU)")
    ax.legend()
    save_figure(fig, png)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round, 1 warm-up + 2 timed steps (smoke run)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="timed steps per schedule per round (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per schedule (default 2)")
    p.add_argument("--schedules", default=",".join(DEFAULT_SCHEDULES), help="compared with 1f1b")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="BenchConfig overrides")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per round's job")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker.split(","), BenchConfig.from_json(args.config), args.result_dir)
        return 0
    entries = [BASELINE, *(s for s in args.schedules.split(",") if s and s != BASELINE)]
    steps = args.steps or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    cfg = config_from_overrides(args.set, steps=steps, warmup_steps=warmup)
    log_dir = Path(tempfile.mkdtemp(prefix="schedule_speedup-logs-"))
    rounds = []
    for r in range(1 if args.quick else args.rounds):
        print(f"[bench] round {r + 1}", end=": ", flush=True)
        rounds.append(run_round(entries, cfg, args.timeout, log_dir / f"round{r + 1}.log"))
    md, png = args.out_dir / f"{REPORT_NAME}.md", args.out_dir / f"{REPORT_NAME}.png"
    body, agree = report(rounds, entries, cfg, png)
    cli = [os.path.relpath(__file__, REPO_ROOT), *(sys.argv[1:] if argv is None else argv)]
    write_markdown_report(md, "Virtual-stage schedules vs Merak 1F1B, paired steps (pp=2, CPU)", body,
                          packages=PACKAGES, argv=cli)
    print(md.read_text())
    if not agree:
        print(f"[bench] a schedule's losses left 1F1B's by more than {LOSS_DRIFT_ATOL}", file=sys.stderr)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
