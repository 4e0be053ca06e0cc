"""Stage times measured inside the running pipeline, for partition calibration.

Why not time each stage on its own (:func:`merak.partitioner.calibration.time_stages`): in a
1F1B pipeline a stage does not run forward-backward-forward-backward on one micro-batch. Stage
``s`` keeps ``P - s`` micro-batches in flight and runs another micro-batch's forward between a
micro-batch's forward and its backward, so its caches are cold when the backward comes; all
ranks compute at once and share the machine; and p2p transfers run beside the compute. On this
project's 2-core CPU benchmark that makes the first stage's backward ~10 % slower than when it
is timed alone while the last stage barely changes: a cut balanced in isolation is not
balanced in the pipeline, and the pipeline runs at the pace of its slowest stage.

So every rank builds its stage of the candidate plan, runs a few dry 1F1B steps of the real
executor (no optimizer step; gradients, RNG state and buffers are restored afterwards, so the
run is invisible to training) and reports the seconds its forward and backward instructions
took per micro-batch. The times are gathered so every rank knows every stage's - replicas of a
stage (data or tensor parallel) are averaged - and :func:`merak.partitioner.calibration.calibrate`
corrects the cost model and cuts again.

Under virtual stages (``placement`` with several chunks per rank) each rank builds its chunks
and runs dry steps of the training schedule itself (interleaved 1F1B, ZB-V, ...): the executor
reports busy time per chunk, so every one of the ``P·v`` chunks gets its own row.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from merak.partitioner import NodeCost, PartitionPlan, StageChunks, build_chunks, build_stage
from merak.partitioner.calibration import Calibration, calibrate
from merak.partitioner.profiler import mean_over_ranks
from merak.runtime.pipeline.executor import LossFn, PipelineExecutor
from merak.runtime.distributed.grid import Grid
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.placement import Placement
from merak.runtime.pipeline.schedule import build, placement_for, uses_weight_passes

__all__ = ["calibrate_in_pipeline", "pipeline_stage_times"]


def pipeline_stage_times(
    plan: PartitionPlan,
    grid: Grid,
    microbatches: Sequence[Mapping[str, Any]],
    *,
    steps: int = 2,
    device: torch.device | str = "cpu",
    loss_fn: LossFn | None = None,
    seed: int = 1234,
    fuse: bool = True,
    timeout_s: float = 300.0,
    schedule: str = "1f1b",
    placement: Placement | None = None,
) -> list[NodeCost]:
    """Every (virtual) stage's forward and backward seconds per micro-batch, measured in
    ``steps`` dry steps of ``schedule`` (after one warm-up step) of ``plan`` on ``grid``.
    ``placement`` says which chunks of ``plan`` each rank holds (default: ``schedule``'s own,
    two chunks per rank for ``interleaved_1f1b``).
    Collective: every rank calls it."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    placement = placement or placement_for(schedule, grid.num_stages)
    if plan.num_stages != placement.num_virtual:
        raise ValueError(f"the plan has {plan.num_stages} stages but {placement} needs {placement.num_virtual}")
    virtual = placement.chunks_of(grid.stage_id)
    chunks = build_chunks(plan, virtual, device=device, seed=seed, fuse=fuse)
    stage = chunks[0] if len(chunks) == 1 else StageChunks(chunks)
    instructions = build(schedule, grid.num_stages, len(microbatches), grid.stage_id,
                         RecomputePlan.from_mode("none", grid.num_stages), placement.num_chunks)
    seconds = [[0.0, 0.0] for _ in chunks]
    with _unchanged(stage, torch.device(device)):
        executor = PipelineExecutor(chunks if len(chunks) > 1 else stage, grid, None, device=device, loss_fn=loss_fn,
                                    timeout_s=timeout_s, zero_bubble=uses_weight_passes(schedule),
                                    placement=placement)
        try:
            for step in range(steps + 1):
                result = executor.run(instructions, microbatches)
                for p in stage.parameters():
                    p.grad = None
                if step:  # the first step warms up (allocator, lazy initialisation)
                    for total, (forward, backward) in zip(seconds, result.chunk_seconds):
                        total[0] += forward
                        total[1] += backward
        finally:
            executor.close()
    per_microbatch = steps * len(microbatches)
    local = {k: NodeCost(f / per_microbatch, b / per_microbatch) for k, (f, b) in zip(virtual, seconds)}
    return _gathered(local, plan.num_stages, timeout_s)


@contextlib.contextmanager
def _unchanged(stage: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore the RNG streams and the stage's buffers (e.g. norm statistics) on exit."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    buffers = {name: b.detach().clone() for name, b in stage.named_buffers()}
    try:
        yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        with torch.no_grad():
            for name, b in stage.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def _gathered(local: Mapping[int, NodeCost], num_stages: int, timeout_s: float) -> list[NodeCost]:
    """Every (virtual) stage's cost from every rank's own: each rank fills its stages' rows and a
    count of 1; averaged over all ranks, a row's times over its count are the mean over that
    stage's replicas."""
    table = torch.zeros(num_stages, 3, dtype=torch.float64)
    for k, cost in local.items():
        table[k] = torch.tensor([cost.forward, cost.backward, 1.0], dtype=torch.float64)
    table = mean_over_ranks(table, None, timeout_s, "the all-reduce of measured pipeline stage times (every rank "
                                                   "must calibrate the partition)")
    return [NodeCost(f / n, b / n) for f, b, n in table.tolist()]


def calibrate_in_pipeline(
    plan: PartitionPlan,
    grid: Grid,
    microbatches: Sequence[Mapping[str, Any]],
    *,
    rounds: int = 3,
    timeout_s: float = 300.0,
    **measure_options: Any,
) -> Calibration:
    """:func:`~merak.partitioner.calibration.calibrate` with stage times measured in the pipeline;
    ``measure_options`` go to :func:`pipeline_stage_times` (``steps``, ``device``, ``loss_fn``,
    ``seed``, ``fuse``)."""
    measure = functools.partial(pipeline_stage_times, grid=grid, microbatches=microbatches, timeout_s=timeout_s,
                                **measure_options)
    return calibrate(plan, rounds=rounds, measure=measure)
