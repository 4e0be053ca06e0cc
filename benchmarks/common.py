"""Helpers any Merak benchmark can use: step timing, environment capture, markdown and PNG output.

Why a shared module: benchmark numbers are only worth committing if the file that holds them
also says *where* and *how* they were taken (machine, library versions, date, exact command),
and every benchmark would otherwise grow its own half-complete version of that header. These
helpers know nothing about pipelines; the pipeline benchmark builds on them.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimedRun:
    """Wall and CPU seconds of each measured call, and every call's return value (warm-up too).

    CPU time is this process's (``time.process_time``); CPU/wall near 1 means a single-threaded
    process had its core to itself, well below 1 means it waited — on peers, or on other jobs
    sharing the machine, which is how a noisy measurement shows itself.
    """

    times: list[float]
    cpu_times: list[float]
    results: list[object]


def time_calls(fn: Callable[[T], R], inputs: Sequence[T], warmup: int,
               before_measuring: Callable[[], None] | None = None) -> TimedRun:
    """Call ``fn`` on each input in order; time each call after the first ``warmup``.

    ``before_measuring`` runs once between warm-up and the timed calls (e.g. a barrier, so that
    ranks of a multi-process job start their measured window together). Return values of all
    calls are kept because benchmarks check results (losses) from warm-up steps too.
    """
    if warmup >= len(inputs):
        raise ValueError(f"need more than {warmup} inputs to time anything, got {len(inputs)}")
    run = TimedRun([], [], [])
    for i, item in enumerate(inputs):
        if i == warmup and before_measuring is not None:
            before_measuring()
        wall, cpu = time.perf_counter(), time.process_time()
        run.results.append(fn(item))
        if i >= warmup:
            run.times.append(time.perf_counter() - wall)
            run.cpu_times.append(time.process_time() - cpu)
    return run


@dataclass(frozen=True)
class Throughput:
    """Items per second summarised over per-step times: median, and the slowest/fastest step."""

    median: float
    low: float
    high: float
    steps: int

    @classmethod
    def from_step_times(cls, step_times: Sequence[float], items_per_step: float) -> "Throughput":
        if not step_times:
            raise ValueError("no step times")
        return cls(
            median=items_per_step / statistics.median(step_times),
            low=items_per_step / max(step_times),
            high=items_per_step / min(step_times),
            steps=len(step_times),
        )


# --------------------------------------------------------------------------------------------
# Where and how a measurement was taken
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def package_version(name: str) -> str:
    """Installed distribution version of ``name``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_info(packages: Iterable[str] = ("torch",)) -> dict[str, str]:
    """Machine, OS, Python and package versions, as ordered ``label -> value`` pairs."""
    info = {
        "machine": f"{_cpu_model()}, {os.cpu_count()} logical CPUs, {_memory_gib()} RAM",
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    info.update({pkg: package_version(pkg) for pkg in packages})
    return info


#: The code a benchmark measures: a report made at commit C stays current while none of these
#: paths changed between C and HEAD (results, docs and tests may change freely).
MEASURED_PATHS = ("merak", "partitioner", "runtime", "launch", "benchmarks/*.py", "benchmarks/peers",
                  "setup.cfg")
REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def code_commit() -> str:
    """The commit the measured code is at (``abc1234``), with ``+uncommitted`` when the measured
    paths differ from it in the work tree (such a report cannot be reproduced from any commit)."""
    head = _git("rev-parse", "--short=12", "HEAD")
    if head is None:
        return "unknown"
    dirty = _git("status", "--porcelain", "--", *MEASURED_PATHS)
    return head + (" +uncommitted" if dirty else "")


def measured_code_changed_since(commit: str) -> list[str] | None:
    """Measured files that differ between ``commit`` and the work tree (``[]``: still current;
    ``None``: unknown, e.g. the commit is not in this clone or the report names none)."""
    base = commit.split()[0] if commit and commit != "unknown" else None
    if base is None or " +uncommitted" in commit:
        return None
    out = _git("diff", "--name-only", base, "--", *MEASURED_PATHS)
    return None if out is None else [line for line in out.splitlines() if line]


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a result, quoted so it can be pasted back into a shell."""
    args = list(sys.argv if argv is None else argv)
    return shlex.join([Path(sys.executable).name, *args])


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; cells are ``str()``-ed and ``|`` is escaped."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = [line(headers), "| " + " | ".join("---" for _ in headers) + " |"]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def write_markdown_report(path: Path, title: str, body: str, packages: Iterable[str] = ("torch",),
                          argv: Sequence[str] | None = None) -> None:
    """Write ``body`` under a header that records date, command, machine and versions."""
    header = [f"# {title}", "",
              f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
              f"- command: `{command_line(argv)}`",
              f"- commit: {code_commit()}"]
    header += [f"- {key}: {value}" for key, value in environment_info(packages).items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header) + "\n\n" + body.rstrip() + "\n")


def bar_chart(path: Path, labels: Sequence[str], values: Sequence[float], title: str,
              ylabel: str, reference_lines: dict[str, float] | None = None,
              highlight: Sequence[bool] | None = None) -> None:
    """Save a PNG bar chart with optional labelled horizontal reference lines.

    ``highlight`` picks bars drawn in a second colour (e.g. Merak's runners against peers).
    matplotlib is imported here, with the non-interactive Agg backend, so the rest of a
    benchmark runs where matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = ["tab:orange" if h else "tab:blue" for h in (highlight or [False] * len(values))]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(values) + 2), 4.5))
    bars = ax.bar(range(len(values)), values, color=colours)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    for i, (name, y) in enumerate((reference_lines or {}).items()):
        ax.axhline(y, linestyle="--", linewidth=1, color=f"C{i + 2}", label=f"{name} ({y:.2f})")
    if reference_lines:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def save_figure(fig: "object", path: Path, dpi: int = 120) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def ping_pong(rank: int, nbytes: int, rounds: int = 20) -> tuple[float, float]:
    """(bytes/s, latency s) of p2p between ranks 0 and 1 of the default process group, from the
    median round trip of a 1-element and an ``nbytes`` float tensor (the other ranks idle)."""
    import torch
    import torch.distributed as dist

    def one_way(numel: int) -> float:
        t = torch.zeros(numel)
        samples = []
        for _ in range(rounds):
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            elif rank == 1:
                dist.recv(t, 0)
                dist.send(t, 0)
            samples.append((time.perf_counter() - start) / 2)
        return statistics.median(samples)

    small, big = one_way(1), one_way(max(nbytes // 4, 1))
    return nbytes / max(big - small, 1e-9), small
