"""Text Gantt chart of a simulated step: one row per stage, one cell per instruction.

Meant for terminals and issue comments, where a picture of the pipeline explains a schedule
faster than its instruction list. Each compute interval is drawn as its label (``F3``, ``B0``,
``BI2``, ``W1``, ``R4``) padded with ``-`` to its length; idle time is ``.``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from merak.runtime.pipeline.simulate import Interval, SimulationResult

#: Widest chart drawn when no width is asked for.
DEFAULT_MAX_WIDTH = 240


def label(interval: Interval) -> str:
    """The instruction without its stage prefix: ``2F3`` → ``F3``; a chunk other than 0 is
    shown by a lower-case code (chunk 1: ``f3``, ``bi3``, ``w3``) or, beyond chunk 1, a
    ``.chunk`` suffix (``F3.2``)."""
    ins = interval.instruction
    code = ins.op.value
    mb = "" if ins.microbatch is None else str(ins.microbatch)
    if ins.chunk == 1:
        return f"{code.lower()}{mb}"
    return f"{code}{mb}" + (f".{ins.chunk}" if ins.chunk else "")


def draw(result: SimulationResult, width: int | None = None) -> str:
    """Render ``result.busy`` as rows of characters plus a time ruler.

    Without ``width`` the scale gives the shortest interval room for its label, up to a chart
    of ``DEFAULT_MAX_WIDTH`` columns; with it the chart is squeezed to about ``width`` columns.
    Labels that do not fit their interval are cut.
    """
    intervals = [i for row in result.busy for i in row if i.end > i.start]
    if not intervals or result.makespan <= 0:
        return "(nothing to draw: no computation took time)"
    if width is None:
        shortest = min(i.end - i.start for i in intervals)
        longest_label = max(len(label(i)) for i in intervals)
        scale = min((longest_label + 1) / shortest, DEFAULT_MAX_WIDTH / result.makespan)
    else:
        scale = max(width, 10) / result.makespan
    columns = math.ceil(result.makespan * scale - 1e-9)
    name_width = len(f"stage {len(result.busy) - 1}")
    rows = [
        f"{f'stage {s}':<{name_width}} |{_row(intervals_s, scale, columns)}|"
        for s, intervals_s in enumerate(result.busy)
    ]
    return "\n".join(rows + [" " * name_width + "  " + _ruler(result.makespan, scale, columns)])


def _row(intervals: Sequence[Interval], scale: float, columns: int) -> str:
    cells = ["."] * columns
    for interval in intervals:
        start, end = round(interval.start * scale), round(interval.end * scale)
        if end <= start:
            continue
        text = label(interval)[: end - start].ljust(end - start, "-")
        cells[start:end] = text
    return "".join(cells[:columns])


def _ruler(makespan: float, scale: float, columns: int) -> str:
    """Tick marks with times, spaced so the numbers do not collide."""
    step = _nice_step(makespan, columns)
    ruler = [" "] * (columns + 8)
    t = 0.0
    while t <= makespan + 1e-9:
        pos = round(t * scale)
        text = f"{t:g}"
        ruler[pos : pos + len(text)] = text
        t += step
    return "".join(ruler).rstrip()


def _nice_step(makespan: float, columns: int) -> float:
    """Smallest of 1, 2, 5, 10, 20, ... time units whose ticks lie >= 6 columns apart."""
    step = 1.0
    while step * columns / makespan < 6:
        for factor in (2.0, 2.5, 2.0):
            step *= factor
            if step * columns / makespan >= 6:
                break
    return step
