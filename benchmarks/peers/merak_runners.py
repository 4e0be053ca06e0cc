"""Merak's runners: one entry per Merak schedule in the throughput comparison.

Each entry runs in the 2 ranks started by ``torchrun`` (gloo, one OpenMP thread per rank) on
the same seeded HF model and data as the peers. Unlike the peers, which are cut by hand at the
block boundary, Merak partitions the model itself (``cost`` method, sub-layer granularity, node
costs *profiled* on this CPU and averaged over the two ranks - ``partition_cost_model="profile"``
in ``MerakArguments`` - then the cut corrected on the stage times measured in dry pipeline steps -
``partition_calibration_rounds``): that automatic balancing is part of what is being measured. The FLOP
roofline would cut after block 4's attention, which on this CPU leaves stage 0 ~8 % slower than
stage 1 (attention's softmax and reshapes cost more time than their FLOPs say). ``step(batch)`` runs one whole
schedule (all micro-batches, tied-gradient reduction, optimizer step).

The driver then checks the first-step loss against the single-process baseline and ranks the
throughput against the fastest peer.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from benchmarks.peers.registry import BenchContext, RankResult, register_runner

#: Merak's executor is wired in below.
WIRED = True

#: Calibration of the profiled cut (``MerakArguments(partition_calibration_rounds=...)``): the
#: stages are timed inside dry 1F1B steps of the pipeline and the cut corrected until it stops moving.
CALIBRATION_ROUNDS, CALIBRATION_STEPS = 3, 2

#: Which recomputation each Merak entry runs with. The shifted critical-path schedule exists to
#: make recomputation cheap, so it is measured with it (and 1F1B with full recompute beside it,
#: the configuration it improves on).
RECOMPUTE = {"1f1b": "none", "1f1b+recompute": "full", "shifted_critical_path": "full",
             "zero_bubble": "none", "interleaved_1f1b": "none", "zb_v": "none"}


def merak_unavailable() -> str | None:
    """Why Merak's runners cannot run, or ``None`` when they can."""
    try:
        found = importlib.util.find_spec("merak.runtime.pipeline.executor") is not None
    except ImportError:
        found = False
    return None if found else "not available: merak.runtime.pipeline.executor cannot be imported"


def run_merak(ctx: BenchContext, entry: str, fuse: bool = True) -> RankResult:
    """Train with Merak: automatic (cost-balanced) partition of the same HF model, Merak's
    executor and schedule, the benchmark's optimizer; the HF model computes its own loss.
    ``fuse=False`` keeps traced op chains unfused (``MerakArguments(fuse_ops=False)``)."""
    import merak

    grid = merak.init(pp=ctx.world_size)
    return ctx.measure(merak_step(ctx, entry, grid, fuse))


def merak_step(ctx: BenchContext, entry: str, grid, fuse: bool = True) -> Callable[[Any], float | None]:  # noqa: ANN001
    """Build ``entry``'s pipeline on ``grid`` (its own seeded model copy, cut and optimizer) and
    return its training step ``step(batch) -> loss``, not yet timed."""
    import torch

    from benchmarks.bench_model import make_optimizer
    from merak.partitioner import build_stage, shard, trace
    from merak.partitioner.profiler import profile_costs
    from merak.runtime.pipeline.executor import PipelineExecutor
    from merak.runtime.pipeline.calibration import calibrate_in_pipeline
    from merak.runtime.memory.recompute_plan import RecomputePlan
    from merak.runtime.pipeline.schedule import VIRTUAL_SCHEDULES, build

    schedule = entry.split("+")[0]
    cfg = ctx.cfg
    if schedule in VIRTUAL_SCHEDULES:
        return _virtual_step(ctx, schedule, grid, fuse)
    model = ctx.build_model()
    ids = ctx.microbatches(ctx.batches()[0])[0]  # profile on real tokens of the benchmark's shape
    example = {"input_ids": ids, "labels": ids}
    graph = trace(model, example)
    plan = shard(graph, grid.num_stages, cost_model=profile_costs(graph, example).averaged())
    probe = [{"input_ids": m, "labels": m} for m in ctx.microbatches(ctx.batches()[0])]
    calibration = calibrate_in_pipeline(plan, grid, probe, rounds=CALIBRATION_ROUNDS, steps=CALIBRATION_STEPS,
                                        fuse=fuse)
    plan = calibration.plan
    if ctx.rank == 0:
        print(calibration.table(), flush=True)
        print(plan.table(), flush=True)
    stage = build_stage(plan, grid.stage_id, fuse=fuse)
    if ctx.rank == 0:
        print(f"fused op chains on stage 0: {stage.fusions or 'none'}", flush=True)
    executor = PipelineExecutor(stage, grid, make_optimizer(stage.parameters(), cfg),
                                zero_bubble=schedule == "zero_bubble")
    recompute = RecomputePlan.from_mode(RECOMPUTE[entry], grid.num_stages)
    instructions = build(schedule, grid.num_stages, cfg.num_microbatches, grid.stage_id, recompute)

    def step(batch: torch.Tensor) -> float | None:
        mbs = [{"input_ids": m, "labels": m} for m in ctx.microbatches(batch)]
        return executor.run(instructions, mbs).loss

    return step


def _virtual_step(ctx: BenchContext, schedule: str, grid, fuse: bool) -> Callable[[Any], float | None]:  # noqa: ANN001
    """A virtual-stage schedule: ``P·v`` chunks cut on profiled node costs (averaged over the
    ranks) and the cut then calibrated in dry steps of the schedule itself, every chunk timed - the
    same two steps as ``run_merak`` and as ``MerakTrainer`` with ``partition_calibration_rounds``.
    Uncalibrated, the profiled cut leaves the ``P·v`` chunks a few per cent apart, and with ``v``
    chunks per rank such a gap is paid ``v`` times per micro-batch."""
    import torch

    from benchmarks.bench_model import make_optimizer
    from merak.partitioner import build_chunks, shard, trace
    from merak.partitioner.profiler import profile_costs
    from merak.runtime.memory.recompute_plan import RecomputePlan
    from merak.runtime.pipeline.calibration import calibrate_in_pipeline
    from merak.runtime.pipeline.executor import PipelineExecutor
    from merak.runtime.pipeline.schedule import build, placement_for, uses_weight_passes

    cfg = ctx.cfg
    placement = placement_for(schedule, grid.num_stages)
    model = ctx.build_model()
    ids = ctx.microbatches(ctx.batches()[0])[0]
    example = {"input_ids": ids, "labels": ids}
    graph = trace(model, example)
    plan = shard(graph, placement.num_virtual, cost_model=profile_costs(graph, example).averaged())
    probe = [{"input_ids": m, "labels": m} for m in ctx.microbatches(ctx.batches()[0])]
    calibration = calibrate_in_pipeline(plan, grid, probe, rounds=CALIBRATION_ROUNDS, steps=CALIBRATION_STEPS,
                                        fuse=fuse, schedule=schedule, placement=placement)
    plan = calibration.plan
    if ctx.rank == 0:
        print(calibration.table(), flush=True)
        print(plan.table(), flush=True)
    chunks = build_chunks(plan, placement.chunks_of(grid.stage_id), fuse=fuse)
    params = list({id(p): p for c in chunks for p in c.parameters()}.values())
    executor = PipelineExecutor(chunks, grid, make_optimizer(params, cfg), placement=placement,
                                zero_bubble=uses_weight_passes(schedule))
    recompute = RecomputePlan.from_mode(RECOMPUTE[schedule], grid.num_stages)
    instructions = build(schedule, grid.num_stages, cfg.num_microbatches, grid.stage_id, recompute,
                         placement.num_chunks)

    def step(batch: torch.Tensor) -> float | None:
        mbs = [{"input_ids": m, "labels": m} for m in ctx.microbatches(batch)]
        return executor.run(instructions, mbs).loss

    return step


def _merak_entry(entry: str) -> Callable[[BenchContext], RankResult]:
    def run(ctx: BenchContext) -> RankResult:
        return run_merak(ctx, entry)

    run.__name__ = f"run_merak_{entry}"
    return run


# ---- registration points: one line per Merak schedule in the comparison ----
for _entry, _what in [("1f1b", "Merak executor, 1F1B"),
                      ("1f1b+recompute", "Merak executor, 1F1B with full recomputation"),
                      ("shifted_critical_path", "Merak executor, shifted critical path (full recompute)"),
                      ("zero_bubble", "Merak executor, zero bubble (ZB-H1)"),
                      ("interleaved_1f1b", "Merak executor, interleaved 1F1B (2 chunks per rank)"),
                      ("zb_v", "Merak executor, ZB-V (2 chunks per rank in a V)")]:
    register_runner(f"merak-{_entry}", group="merak", launcher="torchrun", nprocs=2,
                    description=_what, unavailable=merak_unavailable)(_merak_entry(_entry))
