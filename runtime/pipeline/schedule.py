"""Pipeline schedules: the public entry point and the ``python -m merak.runtime.pipeline.schedule`` CLI.

``build`` returns what one stage's executor runs; ``build_all`` returns every stage's list,
validated together (deadlock freedom and FIFO channel order are properties of the whole set,
not of one list). Schedules are pure functions of (name, P, M, recompute plan, chunks): no
tensors, no process groups, so they can be printed, diffed, validated and simulated anywhere.

Virtual-stage schedules (``VIRTUAL_SCHEDULES``) run ``v`` model chunks per rank; their lists
remember their :class:`~merak.runtime.pipeline.placement.Placement`, which
:func:`placement_for` also answers before anything is built (the partitioner cuts ``P·v``
chunks from it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from merak.runtime.pipeline.instructions import Instruction
from merak.runtime.memory.recompute_plan import RECOMPUTE_MODES, RecomputePlan
from merak.runtime.pipeline.placement import Placement
from merak.runtime.pipeline.schedules import (
    dualpipe_v, gpipe, interleaved, one_f_one_b, shifted_critical_path, zb_v, zero_bubble,
)
from merak.runtime.pipeline.validate import ScheduleError, validate

__all__ = [
    "SCHEDULES", "VIRTUAL_SCHEDULES", "ScheduleError", "build", "build_all", "check_sizes", "main", "placement_for",
    "uses_weight_passes",
]

Builder = Callable[[int, int, "RecomputePlan | None"], list[list[Instruction]]]

_BUILDERS: dict[str, Builder] = {
    "gpipe": gpipe.build_all,
    "1f1b": one_f_one_b.build_all,
    "shifted_critical_path": shifted_critical_path.build_all,
    "zero_bubble": zero_bubble.build_all,
    "zb_v": zb_v.build_all,
    "dualpipe_v": dualpipe_v.build_all,
}

#: Virtual-stage schedules: name -> (placement style, chunks per rank; None = caller's choice,
#: ``interleaved.DEFAULT_CHUNKS`` when not given).
_VIRTUAL: dict[str, tuple[str, int | None]] = {
    "interleaved_1f1b": ("loop", None),
    "zb_v": ("v", 2),
    "dualpipe_v": ("v", 2),
}

#: Schedule names accepted by ``build`` (and the ``schedule`` training argument).
SCHEDULES = ("gpipe", "1f1b", "shifted_critical_path", "zero_bubble", "interleaved_1f1b", "zb_v", "dualpipe_v")
#: The ones that run several model chunks per rank.
VIRTUAL_SCHEDULES = tuple(_VIRTUAL)


#: Schedules that split backwards into input-gradient and weight-gradient passes.
_WEIGHT_PASSES = frozenset({"zero_bubble", "zb_v", "dualpipe_v"})


def uses_weight_passes(name: str) -> bool:
    """Whether schedule ``name`` issues separate ``W`` passes, so the executor must defer
    weight gradients out of ``BI`` (``PipelineExecutor(zero_bubble=True)``)."""
    return name in _WEIGHT_PASSES


def placement_for(name: str, num_stages: int, num_chunks: int | None = None) -> Placement:
    """Which rank holds which model chunk under schedule ``name`` (one chunk per rank for the
    schedules without virtual stages). ``num_chunks`` is only free for ``interleaved_1f1b``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if name not in _VIRTUAL:
        if num_chunks not in (None, 1):
            raise ValueError(f"schedule {name!r} runs one chunk per stage, got num_chunks={num_chunks}; "
                             f"virtual stages need one of {VIRTUAL_SCHEDULES}")
        return Placement.flat(num_stages)
    style, fixed = _VIRTUAL[name]
    if fixed is not None and num_chunks not in (None, fixed):
        raise ValueError(f"schedule {name!r} runs exactly {fixed} chunks per stage, got num_chunks={num_chunks}")
    chunks = fixed or num_chunks or interleaved.DEFAULT_CHUNKS
    if chunks < 2:
        raise ValueError(f"schedule {name!r} needs >= 2 chunks per stage, got {chunks}; use 1f1b for one")
    return Placement(num_stages, chunks, style)


def check_sizes(name: str, num_stages: int, num_microbatches: int) -> None:
    """Raise the schedule's own ``ValueError`` (naming the valid sizes) when ``name`` does not
    take ``num_stages`` x ``num_microbatches``; planners call it to skip such layouts cheaply."""
    placement_for(name, num_stages)
    if name == "interleaved_1f1b":
        interleaved.check_microbatches(num_stages, num_microbatches)
    elif name == "dualpipe_v":
        dualpipe_v.check_microbatches(num_stages, num_microbatches)


def build_all(
    name: str,
    num_stages: int,
    num_microbatches: int,
    recompute_plan: RecomputePlan | None = None,
    num_chunks: int | None = None,
) -> list[list[Instruction]]:
    """Every stage's instruction list for one training step, validated (raises ScheduleError).

    ``num_chunks`` (model chunks per stage) applies to ``interleaved_1f1b`` (default 2); the
    other schedules fix it (:func:`placement_for`).
    """
    placement = placement_for(name, num_stages, num_chunks)
    if name == "interleaved_1f1b":
        schedule = interleaved.build_all(num_stages, num_microbatches, recompute_plan, placement.num_chunks)
    else:
        schedule = _BUILDERS[name](num_stages, num_microbatches, recompute_plan)
    validate(schedule, placement)
    return schedule


def build(
    name: str,
    num_stages: int,
    num_microbatches: int,
    stage_id: int,
    recompute_plan: RecomputePlan | None = None,
    num_chunks: int | None = None,
) -> list[Instruction]:
    """Stage ``stage_id``'s instruction list (see ``build_all``)."""
    if not 0 <= stage_id < num_stages:
        raise ValueError(f"stage_id {stage_id} is outside 0..{num_stages - 1}")
    return build_all(name, num_stages, num_microbatches, recompute_plan, num_chunks)[stage_id]


# --- CLI --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m merak.runtime.pipeline.schedule",
        description="Build a pipeline schedule, simulate one step and print its timeline.",
    )
    p.add_argument("--schedule", required=True, choices=SCHEDULES)
    p.add_argument("--stages", type=int, required=True, help="pipeline stages P")
    p.add_argument("--microbatches", type=int, required=True, help="micro-batches per step M")
    p.add_argument("--chunks", type=int, default=None,
                   help="model chunks per stage v (interleaved_1f1b; default 2; zb_v and dualpipe_v use 2)")
    p.add_argument("--recompute", choices=RECOMPUTE_MODES, default="none")
    p.add_argument(
        "--costs", default="1,1,1,1,0",
        help="F,B,W,R,C: forward, backward-input, backward-weight, recompute, p2p time per micro-batch",
    )
    p.add_argument("--json", action="store_true", help="print {makespan, bubble_ratio, peak_inflight, critical_path}")
    p.add_argument("--width", type=int, default=None, help="squeeze the timeline to about this many columns")
    return p


def _cli_plan(mode: str, name: str, num_stages: int, num_microbatches: int, num_chunks: int | None) -> RecomputePlan:
    """``--recompute``'s plan; ``stage_aware`` with virtual stages is sized per chunk from the
    schedule's own in-flight counts (:mod:`merak.runtime.memory.stage_aware`, which builds schedules)."""
    if mode == "stage_aware" and placement_for(name, num_stages, num_chunks).num_chunks > 1:
        from merak.runtime.memory.stage_aware import stage_aware_plan

        return stage_aware_plan(name, num_stages, num_microbatches, num_chunks)
    return RecomputePlan.from_mode(mode, num_stages)


def main(argv: Sequence[str] | None = None) -> int:
    # Imported here: simulation and drawing are CLI concerns, not needed by the executor.
    from merak.runtime.pipeline.simulate import Costs, simulate
    from merak.runtime.pipeline.timeline import draw

    args = _parser().parse_args(argv)
    try:
        costs = Costs.parse(args.costs)
        plan = _cli_plan(args.recompute, args.schedule, args.stages, args.microbatches, args.chunks)
        schedule = build_all(args.schedule, args.stages, args.microbatches, plan, args.chunks)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = simulate(schedule, costs, plan)
    if args.json:
        print(json.dumps(result.summary()))
        return 0
    chunks = schedule.placement.num_chunks
    per = f" v={chunks} (a chunk costs 1/{chunks} of F,B,W,R)" if chunks > 1 else ""
    print(f"{args.schedule}: P={args.stages} M={args.microbatches}{per} recompute={args.recompute} "
          f"costs F,B,W,R,C={args.costs}")
    print(draw(result, args.width))
    print(f"makespan        {result.makespan:g}")
    print(f"bubble ratio    {result.bubble_ratio:.4f}")
    print(f"peak in-flight  {result.peak_inflight}")
    print(f"peak activations {[round(a, 3) for a in result.peak_activations]} (micro-batches)")
    print(f"critical path   {' '.join(result.critical_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
