"""Pipeline-throughput benchmark: Merak's schedules against DeepSpeed and torch pipelining.

One invocation runs every registered runner (see :mod:`benchmarks.peers`) one after the other
on the same model and data — GPT-2-like, 8 blocks, hidden 256, seq 128, micro-batch 4,
8 micro-batches per step, fp32, AdamW — each as its own job with one OpenMP thread per rank,
and writes a markdown table and a bar chart to ``benchmarks/results/``::

    python benchmarks/pipeline_throughput.py                 # all runners, 3 rounds of 10 timed steps
    python benchmarks/pipeline_throughput.py --quick         # 1 round, 1 warm-up + 2 timed steps
    python benchmarks/pipeline_throughput.py --only single-process,deepspeed-pipe --steps 20
    python benchmarks/pipeline_throughput.py --set vocab_size=8192   # any BenchConfig field
    python benchmarks/pipeline_throughput.py --list                  # runners, and why any skip

Why separate jobs, one after the other: on a 2-core machine a pipeline of 2 ranks owns the
whole CPU, so runners must not overlap, and each framework gets a fresh interpreter (DeepSpeed
and torch pipelining both keep global process-group state).

Rounds: this 2-core VM's speed drifts by ±10 % over minutes (other guests share the host), more
than the differences being measured. So the runner list is run ``--rounds`` times (default 3),
rotated by one runner per round, and each runner's timed steps are pooled: every runner then
samples the same slow and fast periods.

Reported per runner: median samples/s over the timed steps (a step's time is the slowest
rank's), the slowest–fastest step range, the ratio to the fastest peer and to the physical
limit (2 × single-process: both cores busy, no bubble), each rank's CPU/wall ratio (which
exposes other jobs competing for the cores), and the losses: the first-step loss must equal
the single-process one (same weights, tokens, cut and loss) and every later step loss must stay
with it (same gradients and updates) for the row to count; otherwise the exit status is 1.

The same file is also the per-rank worker: the driver starts it with ``--worker NAME``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_model import BenchConfig  # noqa: E402
from benchmarks.common import Throughput, bar_chart, markdown_table, write_markdown_report  # noqa: E402
from benchmarks.peers import BenchContext, RankResult, Runner, runners  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
REPORT_NAME = "pipeline_throughput"
#: Relative tolerance of the first-step loss against the single-process one. The runners do
#: the same fp32 arithmetic on the same tokens, only summed in a different order.
FIRST_LOSS_RTOL = 1e-5
#: Largest tolerated |step loss − single-process step loss| over a run (reordered fp32 sums
#: drift by ~1e-6 here; DeepSpeed's default gradient clipping, left on, drifts by 1e-4 in 2 steps).
LOSS_DRIFT_ATOL = 2e-5
#: Single-process CPU/wall below this means the machine was shared during the run.
QUIET_CPU_PER_WALL = 0.95
#: Environment of every rank: one OpenMP/MKL thread, and DeepSpeed told there is no GPU.
RANK_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
PACKAGES = ("torch", "transformers", "deepspeed", "merak")


# --------------------------------------------------------------------------------------------
# Worker side (runs inside every rank)
# --------------------------------------------------------------------------------------------


def worker_main(name: str, cfg: BenchConfig, result_dir: Path) -> None:
    """Run runner ``name`` in this rank and write ``rank<N>.json`` into ``result_dir``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    ctx = BenchContext.from_env(cfg)
    result = runners()[name].fn(ctx)
    payload = dataclasses.asdict(result) | {"rank": ctx.rank, "threads": torch.get_num_threads()}
    (result_dir / f"rank{ctx.rank}.json").write_text(json.dumps(payload))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobResult:
    """All ranks of one runner merged: a step lasts as long as its slowest rank."""

    step_times: list[float]
    losses: list[float | None]
    cpu_per_wall: list[float]  # per rank: CPU seconds / wall seconds over the timed steps

    @classmethod
    def merge(cls, ranks: list[RankResult]) -> "JobResult":
        times = [max(step) for step in zip(*(r.step_times for r in ranks))]
        losses = [next((v for v in step if v is not None), None) for step in zip(*(r.losses for r in ranks))]
        return cls(times, losses, [sum(r.cpu_times) / sum(r.step_times) for r in ranks])


@dataclass
class Outcome:
    """One runner's row: its results (one per round), or why there is none."""

    runner: Runner
    rounds: list[JobResult] = field(default_factory=list)
    skipped: str | None = None
    failed: str | None = None
    command: str = ""

    @property
    def result(self) -> JobResult | None:
        """All rounds pooled: every timed step of every round (losses: the first round's)."""
        if self.failed or not self.rounds:
            return None
        first = self.rounds[0]
        return JobResult([t for r in self.rounds for t in r.step_times], first.losses,
                         [sum(u) / len(self.rounds) for u in zip(*(r.cpu_per_wall for r in self.rounds))])

    def absorb(self, other: "Outcome") -> None:
        """Add another round's outcome of the same runner."""
        self.command = self.command or other.command
        self.skipped = self.skipped or other.skipped
        self.failed = self.failed or other.failed
        self.rounds.extend(other.rounds)

    def samples_per_s(self, cfg: BenchConfig) -> Throughput | None:
        if self.result is None:
            return None
        return Throughput.from_step_times(self.result.step_times, cfg.samples_per_step)

    def round_medians(self, cfg: BenchConfig) -> list[float]:
        return [Throughput.from_step_times(r.step_times, cfg.samples_per_step).median for r in self.rounds]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(runner: Runner) -> list[str]:
    """The command (run from the repo root) that starts ``runner``'s ranks as workers of this file."""
    script = os.path.relpath(__file__, REPO_ROOT)
    if runner.launcher == "python":
        return [sys.executable, script]
    if runner.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={runner.nprocs}", script]
    if runner.launcher == "deepspeed":  # the `deepspeed` console script is this module's main()
        return [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={runner.nprocs}",
                f"--master_port={_free_port()}", script]
    raise ValueError(f"unknown launcher {runner.launcher!r}")


def run_runner(runner: Runner, cfg: BenchConfig, timeout: float, log_dir: Path) -> Outcome:
    """Launch one runner as its own job and collect its result (never raises for its failures)."""
    reason = runner.unavailable()
    if reason:
        print(f"[bench] {runner.name}: skipped ({reason})", flush=True)
        return Outcome(runner, skipped=reason)
    cmd = launch_command(runner)
    shown = shlex.join(["python", *cmd[1:]])
    log = log_dir / f"{runner.name}.log"
    print(f"[bench] {runner.name}: {shown} ... (log: {log})", flush=True)
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | RANK_ENV | {"PYTHONPATH": pythonpath}
    with tempfile.TemporaryDirectory(prefix=f"bench-{runner.name}-") as tmp:
        worker = ["--worker", runner.name, "--config", cfg.to_json(), "--result-dir", tmp]
        try:
            with log.open("w") as out:
                proc = subprocess.run(cmd + worker, cwd=REPO_ROOT, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(runner, failed=f"timed out after {timeout:.0f} s (log: {log})", command=shown)
        payloads = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("rank*.json"))]
    if proc.returncode != 0 or len(payloads) != runner.nprocs:
        last = (log.read_text().strip().splitlines() or ["no output"])[-1][:200]
        return Outcome(runner, command=shown,
                       failed=f"exit {proc.returncode}, {len(payloads)}/{runner.nprocs} ranks reported; "
                              f"last line: {last} (log: {log})")
    threads = sorted({p.pop("threads") for p in payloads})
    if threads != [1]:
        return Outcome(runner, failed=f"ranks ran with {threads} threads, not 1", command=shown)
    fields = ("step_times", "losses", "cpu_times")
    result = JobResult.merge([RankResult(**{k: p[k] for k in fields}) for p in payloads])
    outcome = Outcome(runner, rounds=[result], command=shown)
    print(f"[bench] {runner.name}: {outcome.samples_per_s(cfg).median:.2f} samples/s", flush=True)
    return outcome


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def loss_check(outcome: Outcome, reference: JobResult | None) -> str:
    """Does ``outcome`` train the single-process model? ``ok``, or what differs.

    The first-step loss (before any update) checks the weights, data, cut and loss; the largest
    step-loss difference over the run checks gradients and updates (tied-weight reduction,
    gradient scaling, clipping). Every round must pass.
    """
    if outcome.result is None or reference is None or outcome.result.losses[0] is None:
        return "n/a"
    for result in outcome.rounds:
        first, ref = result.losses[0], reference.losses[0]
        if first is None or not math.isclose(first, ref, rel_tol=FIRST_LOSS_RTOL):
            return f"MISMATCH: first loss {(first or math.nan) - ref:+.2e}"
        drift = max_loss_drift(result, reference)
        if drift is not None and drift > LOSS_DRIFT_ATOL:
            return f"MISMATCH: loss drifts {drift:.1e}"
    return "ok"


def max_loss_drift(result: JobResult, reference: JobResult) -> float | None:
    """Largest |step loss − single-process step loss| over the steps both report (None: none)."""
    diffs = [abs(a - b) for a, b in zip(result.losses, reference.losses) if a is not None and b is not None]
    return max(diffs, default=None)


@dataclass(frozen=True)
class Report:
    """Everything derived from the outcomes: reference figures, table rows, chart inputs."""

    cfg: BenchConfig
    outcomes: list[Outcome]
    rounds: int = 1

    @property
    def baseline(self) -> Outcome | None:
        """The single-process run, if it ran: the loss reference and half the physical limit."""
        return next((o for o in self.outcomes if o.runner.group == "baseline" and o.result), None)

    @property
    def reference(self) -> JobResult | None:
        return None if self.baseline is None else self.baseline.result

    @property
    def physical_limit(self) -> float | None:
        return None if self.baseline is None else 2 * self.baseline.samples_per_s(self.cfg).median

    @property
    def fastest_peer(self) -> float | None:
        peers = [o.samples_per_s(self.cfg) for o in self.outcomes if o.runner.group == "peer"]
        return max((tp.median for tp in peers if tp), default=None)

    def status(self, o: Outcome) -> str:
        if o.skipped:
            return f"skipped: {o.skipped}"
        if o.failed:
            return f"FAILED: {o.failed}"
        return loss_check(o, self.reference)

    def row(self, o: Outcome) -> list[str]:
        tp, limit, fastest = o.samples_per_s(self.cfg), self.physical_limit, self.fastest_peer
        drift = max_loss_drift(o.result, self.reference) if o.result and self.reference else None
        return [f"`{o.runner.name}`", o.runner.group,
                _fmt(tp and tp.median), f"{tp.low:.2f}–{tp.high:.2f}" if tp else "",
                ", ".join(f"{m:.2f}" for m in o.round_medians(self.cfg)) if o.result else "",
                _fmt(tp and fastest and tp.median / fastest, ".3f"),
                _fmt(tp and limit and tp.median / limit, ".3f"),
                ", ".join(f"{u:.2f}" for u in o.result.cpu_per_wall) if o.result else "",
                _fmt(o.result and o.result.losses[0], ".6f"), _fmt(drift, ".1e"), self.status(o)]

    def markdown(self, quick: bool) -> str:
        cfg, refs = self.cfg, self.reference_lines()
        b = cfg.blocks_per_stage
        table = markdown_table(["runner", "group", "samples/s (median)", "min–max", "per-round medians", "× fastest peer",
                                "× physical limit", "CPU/wall per rank", "first loss", "max |Δloss|",
                                "check / status"], [self.row(o) for o in self.outcomes])
        notes = [
            f"Model: `GPT2LMHeadModel`, {cfg.n_layer} blocks, hidden {cfg.n_embd}, {cfg.n_head} heads, "
            f"seq {cfg.seq_len}, vocab {cfg.vocab_size}, dropout 0, fp32, tied LM head; AdamW lr {cfg.lr}, "
            f"no clipping. Micro-batch {cfg.micro_batch}, M = {cfg.num_microbatches} micro-batches "
            f"({cfg.samples_per_step} samples) per step, pp = {cfg.num_stages}, one OpenMP thread per rank; "
            f"{cfg.warmup_steps} warm-up step(s) excluded, {cfg.steps} timed steps per round, "
            f"{self.rounds} round(s)" + (" (**`--quick` run: too few steps to quote**)." if quick else "."),
            "Rounds: the whole runner list is run once per round, rotated by one runner each round, so "
            "slow drifts of a shared machine hit every runner alike; samples/s pools the timed steps of "
            "all rounds, and each round's own median is listed beside it.",
            f"Stage cut of the peers (by hand, at a block boundary): stage 0 = embeddings + blocks 0–{b - 1}; "
            f"stage 1 = blocks {b}–{2 * b - 1} + `ln_f` + tied LM head. Merak cuts the same HF model "
            "itself (automatic, below layer granularity; its plan table is in the runner's log).",
            f"Physical limit = 2 × single-process = {_fmt(refs.get('physical limit'))} samples/s; the 1F1B "
            f"bound with equal stages is limit × M/(M+P−1) = {_fmt(refs.get('1F1B bound'))}. "
            "A step lasts as long as its slowest rank; "
            "samples/s is the median over timed steps, min–max the slowest and fastest step.",
            "Merak's runners run with Merak's defaults, two of which the peers do not have: on CPU "
            "`merak.init` keeps freed host memory for reuse (`runtime/memory/host_allocator.py`), and stages run "
            "traced op chains as the kernels an eager model calls (`partitioner/fusion.py`): GPT-2's tanh "
            "GELU as one kernel (equal to ~2e-7), and the causal mask the trace builds as SDPA's "
            "`is_causal=True` - which the peers' blocks, called without a mask, get anyway. The "
            "`reference` rows (not counted as peers) separate them: DeepSpeed with the allocator setting, "
            "and Merak 1F1B without these graph rewrites.",
            "CPU/wall: each rank's CPU seconds over wall seconds in the timed steps — about 1.0 for the "
            "single process on an idle core; lower means waiting (pipeline bubble, or other jobs on the "
            "machine).",
            f"Check: first-step loss (before any update) within rel. {FIRST_LOSS_RTOL:g} of single-process, "
            f"and every later step loss within {LOSS_DRIFT_ATOL:g} (`max |Δloss|`): same weights, data, "
            "cut, loss, gradients and updates.",
            "",
            "Launch commands, run from the repository root (every rank gets "
            + ", ".join(f"`{k}={v}`" for k, v in RANK_ENV.items()) + "):",
            "",
            *[f"- `{o.runner.name}`: `{o.command} --worker {o.runner.name} ...`"
              for o in self.outcomes if o.command],
        ]
        return "\n".join([*self.noise_warning(), table, "", *notes])

    def noise_warning(self) -> list[str]:
        """A warning paragraph when the single process did not have a core to itself.

        One thread on an idle core spends ~all its wall time on the CPU; much less means other
        jobs shared the cores, and every figure of this run (the limit included) is understated.
        """
        if self.baseline is None:
            return []
        busy = self.baseline.result.cpu_per_wall[0]
        if busy >= QUIET_CPU_PER_WALL:
            return []
        return [f"**Noisy run: the single process got only {busy:.2f} of a core (CPU/wall), so other jobs "
                "were sharing the machine; these figures are not quotable.**", ""]

    def reference_lines(self) -> dict[str, float]:
        limit = self.physical_limit
        if not limit:
            return {}
        m, p = self.cfg.num_microbatches, self.cfg.num_stages
        return {"physical limit": limit, "1F1B bound": limit * m / (m + p - 1)}

    def chart(self, path: Path) -> bool:
        """Bar chart of median samples/s (Merak's runners highlighted); False if nothing ran."""
        measured = [o for o in self.outcomes if o.result]
        if not measured:
            return False
        cfg = self.cfg
        bar_chart(path, [o.runner.name for o in measured], [o.samples_per_s(cfg).median for o in measured],
                  title=f"GPT-2-like ({cfg.n_layer} blocks, H={cfg.n_embd}, vocab {cfg.vocab_size}), "
                        f"pp={cfg.num_stages}, M={cfg.num_microbatches}, 1 thread/rank",
                  ylabel="samples/s (median)", reference_lines=self.reference_lines(),
                  highlight=[o.runner.group == "merak" for o in measured])
        return True

    def failures(self) -> list[str]:
        return [o.runner.name for o in self.outcomes if self.status(o).startswith(("FAILED", "MISMATCH"))]


def config_from_overrides(overrides: list[str], **fixed: int) -> BenchConfig:
    """``BenchConfig`` from ``FIELD=VALUE`` strings (values parsed as the field's type)."""
    types = {f.name: type(getattr(BenchConfig, f.name)) for f in dataclasses.fields(BenchConfig)}
    values: dict[str, object] = dict(fixed)
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise SystemExit(f"--set expects FIELD=VALUE with FIELD in {sorted(types)}, got {item!r}")
        values[name] = types[name](value)
    return BenchConfig(**values)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps (smoke run)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per runner (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per runner (default 2)")
    p.add_argument("--rounds", type=int, default=3,
                   help="run the runner list this many times, rotated, and pool the steps (default 3; "
                        "--quick runs 1)")
    p.add_argument("--only", default="", help="comma-separated runner names (default: all)")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override BenchConfig fields, e.g. --set vocab_size=8192 n_layer=4")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the .md and .png go")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per runner before it is killed")
    p.add_argument("--list", action="store_true", help="list the runners and exit")
    # worker mode (set by the driver; the deepspeed launcher also appends --local_rank=N)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, BenchConfig.from_json(args.config), args.result_dir)
        return 0
    registry = runners()
    if args.list:
        for r in registry.values():
            print(f"{r.name:30s} {r.group:9s} {r.launcher:9s} x{r.nprocs}  {r.unavailable() or 'available'}")
        return 0
    names = [n for n in args.only.split(",") if n] or list(registry)
    unknown = sorted(set(names) - set(registry))
    if unknown:
        print(f"unknown runner(s) {unknown}; known: {list(registry)}", file=sys.stderr)
        return 2
    steps = args.steps or (2 if args.quick else BenchConfig.steps)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else BenchConfig.warmup_steps)
    cfg = config_from_overrides(args.set, steps=steps, warmup_steps=warmup)

    log_dir = Path(tempfile.mkdtemp(prefix="pipeline_throughput-logs-"))
    rounds = 1 if args.quick else args.rounds
    outcomes = {n: Outcome(registry[n]) for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if outcomes[name].failed or outcomes[name].skipped:
                continue
            if rounds > 1:
                print(f"[bench] round {r + 1}/{rounds}", end=": ", flush=True)
            outcomes[name].absorb(run_runner(registry[name], cfg, args.timeout, log_dir))
    report = Report(cfg, [outcomes[n] for n in names], rounds)
    md, png = args.out_dir / f"{REPORT_NAME}.md", args.out_dir / f"{REPORT_NAME}.png"
    body = report.markdown(args.quick)
    if report.chart(png):
        body += f"\n\n![samples/s per runner]({png.name})"
    cli = [os.path.relpath(__file__, REPO_ROOT), *(sys.argv[1:] if argv is None else argv)]
    write_markdown_report(md, "Pipeline throughput: Merak vs peers (pp=2, CPU)", body,
                          packages=PACKAGES, argv=cli)
    print(md.read_text())
    failures = report.failures()
    if failures:
        print(f"[bench] failed or not training the same model: {failures}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
