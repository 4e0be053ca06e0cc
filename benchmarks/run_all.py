"""Run every Merak benchmark and gather their reports into one ``RESULTS.md``.

Why one driver: each benchmark stands alone (its own command line, ``--quick`` for a CI-sized
run, its own ``.md`` and PNG plots under ``--out-dir``), but a reader wants one page that says on
which machine, with which versions and when *all* the numbers were taken, and which benchmarks
did not run. Every benchmark runs in its own process (one OpenMP thread per rank) so a crash or
a hang in one is reported and the others still run.

Usage (from the repository root)::

    python benchmarks/run_all.py                      # full runs -> benchmarks/results/*, benchmarks/RESULTS.md
    python benchmarks/run_all.py --quick --out-dir /tmp/bench    # CI-sized, RESULTS.md in /tmp/bench
    python benchmarks/run_all.py --only schedule_bubbles,memory  # a subset
    python benchmarks/run_all.py --collect            # re-write RESULTS.md from current reports already there
    python benchmarks/run_all.py --check              # which reports are stale (measured code changed since)
    python benchmarks/run_all.py --list

Exit status is non-zero if any selected benchmark failed or timed out.

Every report names the commit its measured code was at (``- commit:``). ``RESULTS.md`` is only
ever made of reports whose measured code (``benchmarks.common.MEASURED_PATHS``) is unchanged
since that commit: ``--collect`` refuses stale reports and names the benchmarks to re-run, so the
page never mixes numbers of an older build with a newer one's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    markdown_table, measured_code_changed_since, write_markdown_report)

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DEFAULT_OUT = HERE / "results"
PACKAGES = ("torch", "transformers", "deepspeed", "merak")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script: it takes ``--quick`` and ``--out-dir`` and writes ``<report>.md``."""

    name: str
    what: str
    timeout_s: float = 3600.0
    quick_timeout_s: float = 600.0

    @property
    def script(self) -> Path:
        return HERE / f"{self.name}.py"

    @property
    def report(self) -> str:
        return f"{self.name}.md"


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("schedule_bubbles", "schedule timelines (Gantt per stage) and bubble ratio vs micro-batches, simulated"),
    Benchmark("partition_balance", "partition balance per method on GPT-2 XL, LLaMA-2 7B/13B, NeoX-20B (meta)"),
    # Its quick run still launches every runner (about 15 two-process jobs, each starting, tracing
    # and cutting a model), which alone takes over 10 minutes on a loaded 2-core machine.
    Benchmark("pipeline_throughput", "throughput vs DeepSpeed's pipeline engine and torch.distributed.pipelining",
              quick_timeout_s=1800.0),
    Benchmark("schedule_speedup", "virtual-stage schedules vs Merak 1F1B, steps alternated in one job (paired ratios)"),
    Benchmark("tensor_parallel", "sub-pipelined tensor parallelism"),
    Benchmark("memory", "memory per stage by recompute mode, estimated vs measured; stage-aware vs full"),
    Benchmark("cluster_sim", "cluster-scale simulator: the Merak paper's 64-GPU table"),
    Benchmark("planner_validation", "planner ranking vs measured step times on this CPU (Spearman)"),
    Benchmark("checkpoint_io", "checkpoint save / load / HF export per rank: per-rank files + gather (old) vs DCP + "
                               "per-stage shards (new)"),
)


@dataclass
class Outcome:
    benchmark: Benchmark
    status: str  # ok | failed (rc N) | timed out | missing
    seconds: float
    log: Path | None


def run_one(bench: Benchmark, out_dir: Path, quick: bool, log_dir: Path) -> Outcome:
    """Run one benchmark script in its own process; its output goes to a log file."""
    if not bench.script.exists():
        return Outcome(bench, "missing", 0.0, None)
    script = os.path.relpath(bench.script, REPO_ROOT)  # as a user would type it (reports quote it)
    cmd = [sys.executable, script, "--out-dir", str(out_dir)] + (["--quick"] if quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    log = log_dir / f"{bench.name}.log"
    timeout = bench.quick_timeout_s if quick else bench.timeout_s
    print(f"[run_all] {bench.name}: {' '.join(cmd[1:])} (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as sink:
        try:
            rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
            status = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f}s"
    seconds = time.perf_counter() - start
    if status == "ok" and not (out_dir / bench.report).exists():
        status = f"failed (wrote no {bench.report})"
    print(f"[run_all] {bench.name}: {status} in {seconds:.0f}s", flush=True)
    return Outcome(bench, status, seconds, log)


def report_commit(report: Path) -> str:
    """The ``- commit:`` a report was written with (``""`` for reports older than the field)."""
    for line in report.read_text().splitlines()[:20]:
        if line.startswith("- commit: "):
            return line[len("- commit: "):].strip()
    return ""


def stale_reports(benchmarks: list[Benchmark], out_dir: Path) -> dict[str, str]:
    """Benchmark name -> why its report in ``out_dir`` does not measure the current code."""
    stale = {}
    for bench in benchmarks:
        report = out_dir / bench.report
        if not report.exists():
            stale[bench.name] = "no report"
            continue
        commit = report_commit(report)
        changed = measured_code_changed_since(commit)
        if changed is None:
            stale[bench.name] = f"made at {commit or 'an unnamed commit'}, not reproducible from this clone"
        elif changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            stale[bench.name] = f"made at {commit}; since then changed: {', '.join(changed[:3])}{more}"
    return stale


def _embedded(report: Path, image_prefix: str) -> str:
    """A benchmark's report inside RESULTS.md: its title becomes a section, its headings move one
    level down, and image links are made relative to RESULTS.md."""
    lines = report.read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines = ["## " + lines[0][2:]] + lines[1:]
    body = "\n".join(("#" + line) if line.startswith("## ") and i else line for i, line in enumerate(lines))
    if image_prefix:
        body = re.sub(r"\]\((?!https?://|/)([^)]+\.png)\)", lambda m: f"]({image_prefix}{m.group(1)})", body)
    return body


def write_results(outcomes: list[Outcome], out_dir: Path, results_md: Path, quick: bool,
                  argv: list[str]) -> None:
    rows = [[f"`{o.benchmark.name}`", o.benchmark.what, o.status, f"{o.seconds:.0f}" if o.seconds else "-",
             f"[{o.benchmark.report}]({_relative(out_dir / o.benchmark.report, results_md.parent)})"
             if (out_dir / o.benchmark.report).exists() else "-"] for o in outcomes]
    prefix = _relative(out_dir, results_md.parent)
    prefix = "" if prefix == "." else prefix + "/"
    sections = [_embedded(out_dir / o.benchmark.report, prefix) for o in outcomes
                if o.status == "ok"]
    body = "\n\n".join([
        ("**`--quick` run: CI-sized smoke numbers, not for quoting.**\n" if quick else "")
        + "Each benchmark also runs alone: `python benchmarks/<name>.py [--quick] [--out-dir DIR]`; "
        "every section below repeats the exact command, machine and versions it was taken with.",
        markdown_table(["benchmark", "what", "status", "seconds", "report"], rows),
        *sections,
    ])
    cli = [os.path.relpath(__file__, REPO_ROOT), *argv]
    write_markdown_report(results_md, "Merak benchmark results", body, packages=PACKAGES, argv=cli)


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized runs of every benchmark")
    p.add_argument("--only", default=None, help="comma-separated benchmark names (default: all)")
    p.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where reports and plots go (default: benchmarks/results, or a temporary "
                        "directory with --quick)")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: gather the reports already in --out-dir into RESULTS.md (each keeps "
                        "the date and command it was taken with)")
    p.add_argument("--check", action="store_true",
                   help="run nothing: list the reports in --out-dir whose measured code changed since "
                        "the commit they name (exit 1 if any)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return p.parse_args(argv)


def select(only: str | None, skip: str) -> list[Benchmark]:
    known = {b.name: b for b in BENCHMARKS}
    wanted = only.split(",") if only else list(known)
    unknown = sorted(set(wanted + [s for s in skip.split(",") if s]) - set(known))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {sorted(known)}")
    return [known[n] for n in wanted if n not in set(skip.split(","))]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list:
        for b in BENCHMARKS:
            print(f"{b.name:22s} {b.what}{'' if b.script.exists() else '  (script missing)'}")
        return 0
    chosen = select(args.only, args.skip)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="merak-bench-")) if args.quick else DEFAULT_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_md = HERE / "RESULTS.md" if out_dir.resolve() == DEFAULT_OUT.resolve() else out_dir / "RESULTS.md"
    log_dir = out_dir / "logs"  # git ignores benchmarks/results/logs
    if args.check or args.collect:
        stale = stale_reports(chosen, out_dir)
        for name, why in stale.items():
            print(f"[run_all] stale: {name}: {why}")
        if stale:
            print(f"[run_all] re-run them: python benchmarks/run_all.py --only {','.join(stale)}"
                  + (f" --out-dir {args.out_dir}" if args.out_dir else ""), file=sys.stderr)
            return 1 if args.check else 2
        if args.check:
            print(f"[run_all] all {len(chosen)} reports measure the current code")
            return 0
    if args.collect:
        outcomes = [Outcome(b, "ok" if (out_dir / b.report).exists() else "missing", 0.0, None) for b in chosen]
    else:
        log_dir.mkdir(exist_ok=True)
        outcomes = [run_one(b, out_dir, args.quick, log_dir) for b in chosen]
    write_results(outcomes, out_dir, results_md, args.quick, argv)
    bad = [o for o in outcomes if o.status != "ok"]
    print(f"[run_all] wrote {results_md}; {len(outcomes) - len(bad)}/{len(outcomes)} benchmarks ok"
          + (f"; not ok: {', '.join(f'{o.benchmark.name} ({o.status})' for o in bad)}" if bad else ""))
    for o in bad:
        if o.log is not None:
            tail = o.log.read_text().splitlines()[-15:]
            print(f"[run_all] last lines of {o.log}:\n" + "\n".join(tail), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
