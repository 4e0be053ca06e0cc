"""Simulated bubbles of every pipeline schedule: makespan, bubble ratio, peak memory.

Why simulate: the schedules are pure data, so their step time under given per-micro-batch
costs follows from the discrete-event simulator alone (``merak.runtime.pipeline.simulate``), with no
model, no processes and no noise from this shared 2-core machine. This is the table to read
before choosing a schedule; the measured throughput lives in ``pipeline_throughput.py``.

Usage (from the repository root)::

    python benchmarks/schedule_bubbles.py [--quick] [--costs F,B,W,R,C] [--out-dir DIR]

Writes ``schedule_bubbles.md``, ``schedule_timeline_<schedule>_<recompute>.png`` (P=4, M=8)
and ``schedule_bubble_vs_m.png`` under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, write_markdown_report  # noqa: E402
from merak.runtime.memory.recompute_plan import RecomputePlan  # noqa: E402
from merak.runtime.pipeline.schedule import build_all  # noqa: E402
from merak.runtime.pipeline.simulate import Costs, SimulationResult, simulate  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"

#: (schedule, recompute) pairs worth comparing: shifted without recomputation is 1F1B.
CONFIGS: tuple[tuple[str, str], ...] = (
    ("gpipe", "none"),
    ("gpipe", "full"),
    ("1f1b", "none"),
    ("1f1b", "full"),
    ("1f1b", "stage_aware"),
    ("shifted_critical_path", "full"),
    ("shifted_critical_path", "stage_aware"),
    ("zero_bubble", "none"),
    ("zero_bubble", "full"),
    ("interleaved_1f1b", "none"),
    ("interleaved_1f1b", "full"),
    ("zb_v", "none"),
    ("zb_v", "full"),
    ("dualpipe_v", "none"),
    ("dualpipe_v", "full"),
)
#: Drawn as Gantt charts at P=4, M=8.
TIMELINES = (
    ("gpipe", "none"),
    ("1f1b", "none"),
    ("1f1b", "full"),
    ("shifted_critical_path", "full"),
    ("zero_bubble", "none"),
    ("interleaved_1f1b", "none"),
    ("zb_v", "none"),
    ("zb_v", "full"),
    ("dualpipe_v", "none"),
)
_COLOURS = {"F": "tab:blue", "B": "tab:green", "BI": "tab:cyan", "W": "tab:orange", "R": "tab:red"}


@dataclass(frozen=True)
class Row:
    schedule: str
    recompute: str
    stages: int
    microbatches: int
    result: SimulationResult


def simulate_config(schedule: str, recompute: str, p: int, m: int, costs: Costs) -> Row:
    """The simulated row of one configuration; raises ``ValueError`` where the schedule refuses
    (P, M). Built once per (schedule, recompute, P, M, costs): the table, the curve against M and
    the timelines share their configurations, and building a schedule (with its rendezvous
    repair) is what the benchmark spends its time on."""
    row = _simulated(schedule, recompute, p, m, costs)
    if isinstance(row, str):
        raise ValueError(row)
    return row


@functools.lru_cache(maxsize=None)
def _simulated(schedule: str, recompute: str, p: int, m: int, costs: Costs) -> Row | str:
    """:func:`simulate_config`'s memo; a refusal is kept as its message (``lru_cache`` does
    not keep exceptions), so a refused configuration is not rebuilt either."""
    plan = RecomputePlan.from_mode(recompute, p)
    try:
        instructions = build_all(schedule, p, m, plan)
    except ValueError as refused:
        return str(refused)
    return Row(schedule, recompute, p, m, simulate(instructions, costs, plan))


def grid(stages: Sequence[int], factors: Sequence[int], costs: Costs) -> list[Row]:
    """Every config at every (P, M = f·P) it accepts (DualPipeV needs M >= 2P)."""
    rows = []
    for p in stages:
        for f in factors:
            for name, mode in CONFIGS:
                try:
                    rows.append(simulate_config(name, mode, p, f * p, costs))
                except ValueError:
                    continue
    return rows


def table(rows: Sequence[Row]) -> str:
    """One line per configuration; makespan also relative to 1F1B without recomputation."""
    baseline = {
        (r.stages, r.microbatches): r.result.makespan
        for r in rows
        if (r.schedule, r.recompute) == ("1f1b", "none")
    }
    headers = ["schedule", "recompute", "P", "M", "makespan", "× 1f1b", "bubble ratio",
               "peak in-flight", "peak activations"]
    body = [
        [
            r.schedule, r.recompute, r.stages, r.microbatches, f"{r.result.makespan:g}",
            f"{r.result.makespan / baseline[(r.stages, r.microbatches)]:.3f}",
            f"{r.result.bubble_ratio:.4f}", max(r.result.peak_inflight),
            f"{max(r.result.peak_activations):g}",
        ]
        for r in rows
    ]
    return markdown_table(headers, body)


def reference_figures(rows: Sequence[Row]) -> str:
    """DESIGN.md's P=4, M=8 comparison in one sentence (empty if the grid lacks P=4, M=8)."""
    found = {(r.schedule, r.recompute): r.result.makespan for r in rows if (r.stages, r.microbatches) == (4, 8)}
    if not found:
        return ""
    parts = [f"{name} + {mode} recompute {found[(name, mode)]:g}" for name, mode in CONFIGS if (name, mode) in found]
    return "Makespans at P=4, M=8 (DESIGN.md's reference: 1F1B + full recompute 44, Merak's shifted 38, " \
        "shifted + stage-aware 35.5, no recompute 33; issue 17's targets: interleaved v=2 ≤ 28.5, " \
        "zb_v ≤ 26 (its bound 25.5), zb_v + full recompute ≤ 33): " + "; ".join(parts) + "."


def plot_timeline(result: SimulationResult, path: Path, title: str) -> None:
    """Gantt chart of ``result``: one row per stage, one labelled box per computation."""
    plt = _pyplot()
    stages = len(result.busy)
    fig, ax = plt.subplots(figsize=(max(8.0, result.makespan * 0.28), 0.55 * stages + 1.2))
    for s, row in enumerate(result.busy):
        for interval in row:
            ins = interval.instruction
            width = interval.end - interval.start
            ax.broken_barh([(interval.start, width)], (s - 0.4, 0.8),
                           facecolors=_COLOURS.get(ins.op.value, "grey"), edgecolor="black", linewidth=0.4,
                           hatch="///" if ins.chunk else None)  # hatched: a rank's second chunk
            if width >= 0.5:
                ax.text(interval.start + width / 2, s, f"{ins.op.value}{ins.microbatch}",
                        ha="center", va="center", fontsize=6 if width >= 1 else 5, color="white")
    ax.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
    ax.invert_yaxis()
    ax.set_xlim(0, result.makespan)
    ax.set_xlabel("time (units of one forward)")
    ax.set_title(f"{title}: makespan {result.makespan:g}, bubble ratio {result.bubble_ratio:.3f}", fontsize=9)
    _save(fig, path)


def plot_bubble_vs_m(rows: Sequence[Row], path: Path) -> None:
    """Bubble ratio against micro-batches, one panel per pipeline depth, one line per config."""
    plt = _pyplot()
    depths = sorted({r.stages for r in rows})
    fig, axes = plt.subplots(1, len(depths), figsize=(4.2 * len(depths), 3.8), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], depths):
        for i, (name, mode) in enumerate(CONFIGS):
            points = sorted((r.microbatches, r.result.bubble_ratio) for r in rows
                            if (r.stages, r.schedule, r.recompute) == (p, name, mode))
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=f"{name} ({mode})",
                        linestyle="-" if mode == "none" else "--", color=f"C{i}")
        ax.set_title(f"P = {p}", fontsize=9)
        ax.set_xlabel("micro-batches M")
    axes[0][0].set_ylabel("bubble ratio (idle / makespan)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save(fig, path)


def _pyplot():
    """matplotlib with the non-interactive backend, imported only when drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    _pyplot().close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="P in {4, 8}, M in {P, 2P}: a smoke run")
    p.add_argument("--costs", default="1,1,1,1,0", help="F,B,W,R,C per micro-batch (default: DESIGN.md's 1:1:1:1, no latency)")
    p.add_argument("--out-dir", "--out", dest="out", type=Path, default=RESULTS,
                   help="directory for the report and plots")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    costs = Costs.parse(args.costs)
    stages, factors = ((4, 8), (1, 2)) if args.quick else ((4, 8, 16), (1, 2, 4))
    rows = grid(stages, factors, costs)
    curve = grid(stages, (1, 2, 3, 4, 6, 8) if not args.quick else (1, 2, 4), costs)
    plot_bubble_vs_m(curve, args.out / "schedule_bubble_vs_m.png")
    pictures = []
    for name, mode in TIMELINES:
        row = simulate_config(name, mode, 4, 8, costs)
        png = f"schedule_timeline_{name}_{mode}.png"
        plot_timeline(row.result, args.out / png, f"{name}, recompute={mode}, P=4, M=8")
        pictures.append(f"![{name} {mode}]({png})")
    body = "\n\n".join([
        f"Simulated with per-micro-batch costs F,B,W,R,C = {args.costs} (B+W is a full backward; "
        "R is charged × the stage's recompute fraction; C is the link time of one message).",
        "*bubble ratio* = idle / makespan averaged over stages, where recomputation counts as busy "
        "time: a schedule that recomputes can show a smaller ratio and still take longer, so compare "
        "makespans (`× 1f1b` = makespan / 1F1B-without-recomputation's). *peak in-flight*: most "
        "micro-batches held by one stage (forwarded, backward not finished). *peak activations*: "
        "most saved activations alive on one stage, in micro-batches (a recomputed one keeps "
        "1 − fraction until its recomputation). Virtual-stage schedules (interleaved_1f1b with v = 2, "
        "zb_v, dualpipe_v) cut the model into 2P chunks, each costing half a stage; their peak "
        "in-flight counts (chunk, micro-batch) pairs, their peak activations stage-sized micro-batches; "
        "hatched boxes in their timelines are a rank's second chunk. DualPipeV needs M >= 2P.",
        reference_figures(rows),
        table(rows),
        "![bubble ratio vs M](schedule_bubble_vs_m.png)",
        *pictures,
    ])
    cli = [os.path.relpath(__file__, REPO_ROOT), *(sys.argv[1:] if argv is None else argv)]
    write_markdown_report(args.out / "schedule_bubbles.md", "Pipeline schedules: simulated bubbles",
                          body, packages=(), argv=cli)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
