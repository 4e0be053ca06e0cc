"""Peer: ``torch.distributed.pipelining`` — ``PipelineStage`` + ``Schedule1F1B`` over gloo.

How the model is split: manually, with :func:`benchmarks.bench_model.stage_module` (the same
pieces every runner uses), rather than with the tracer-based ``pipeline()`` split. The manual
split keeps the fixed benchmark cut exact and avoids tracing HF's GPT-2 (cache and mask
plumbing) through ``torch.export``.

Tied weights: ``torch.distributed.pipelining`` has no notion of parameters shared between
stages. Each stage owns a copy of the token-embedding matrix (stage 0 embeds, stage 1 uses it
as the LM head); both start from the same seeded tensor, their gradients are summed with one
``all_reduce`` over the two ranks after the schedule's backward passes, and the identical AdamW
updates keep the copies equal — the same thing DeepSpeed does for ``TiedLayerSpec``.

Loss scaling: the loss function returns the per-micro-batch mean and the schedule's default
``scale_grads=True`` divides gradients by M, so gradients are those of the mean over the step,
as in the single-process baseline.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from benchmarks.bench_model import chunk_module, lm_loss, make_optimizer, stage_module, tied_parameter
from benchmarks.peers.registry import BenchContext, RankResult, register_runner


@register_runner("torch-pipelining-1f1b", group="peer", launcher="torchrun", nprocs=2,
                 description="torch.distributed.pipelining PipelineStage + Schedule1F1B, gloo")
def run_torch_pipelining(ctx: BenchContext) -> RankResult:
    """One stage per rank driven by ``Schedule1F1B``; tied-weight gradients all-reduced by hand."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    dist.init_process_group("gloo")
    cfg = ctx.cfg
    module = stage_module(ctx.build_model(), cfg, ctx.rank)
    stage = PipelineStage(module, ctx.rank, cfg.num_stages, torch.device("cpu"))
    schedule = Schedule1F1B(stage, cfg.num_microbatches, loss_fn=lm_loss)
    optimizer = make_optimizer(module.parameters(), cfg)
    tied = tied_parameter(module)

    def step(batch: torch.Tensor) -> float | None:
        losses: list[torch.Tensor] = []
        if stage.is_first:
            schedule.step(batch)
        else:
            schedule.step(target=batch, losses=losses, return_outputs=False)
        dist.all_reduce(tied.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean().item() if losses else None

    return ctx.measure(step)


#: torch's virtual-stage schedules: class name and placement (which ranks hold which chunk).
_VIRTUAL = {"interleaved": ("ScheduleInterleaved1F1B", "loop"), "zbv": ("ScheduleZBVZeroBubble", "v")}


def _run_virtual(ctx: BenchContext, kind: str) -> RankResult:
    """Two chunks per rank (:func:`benchmarks.bench_model.chunk_module`, blocks split evenly)
    driven by torch's own schedule. In the loop placement the embedding (chunk 0, rank 0) and
    the LM head (last chunk, rank 1) are copies whose gradients are all-reduced by hand; in the
    V both sit on rank 0 and share one matrix."""
    from torch.distributed import pipelining

    dist.init_process_group("gloo")
    cfg = ctx.cfg
    name, style = _VIRTUAL[kind]
    p, total = cfg.num_stages, 2 * cfg.num_stages
    mine = [ctx.rank, ctx.rank + p] if style == "loop" else [ctx.rank, total - 1 - ctx.rank]
    model = ctx.build_model()
    modules = [chunk_module(model, cfg, k, total) for k in mine]
    stages = [pipelining.PipelineStage(m, k, total, torch.device("cpu")) for m, k in zip(modules, mine)]
    schedule = getattr(pipelining, name)(stages, cfg.num_microbatches, loss_fn=lm_loss)
    params = list({id(q): q for m in modules for q in m.parameters()}.values())
    optimizer = make_optimizer(params, cfg)
    first, last = 0 in mine, total - 1 in mine
    tied = tied_parameter(modules[0]) if first else tied_parameter(modules[-1]) if last else None

    def step(batch: torch.Tensor) -> float | None:
        losses: list[torch.Tensor] = []
        if first and last:
            schedule.step(batch, target=batch, losses=losses)
        elif first:
            schedule.step(batch)
        else:
            schedule.step(target=batch, losses=losses, return_outputs=False)
        if style == "loop" and tied is not None:
            dist.all_reduce(tied.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean().item() if losses else None

    return ctx.measure(step)


@register_runner("torch-pipelining-interleaved", group="peer", launcher="torchrun", nprocs=2,
                 description="torch.distributed.pipelining ScheduleInterleaved1F1B, 2 chunks per rank, gloo")
def run_torch_interleaved(ctx: BenchContext) -> RankResult:
    return _run_virtual(ctx, "interleaved")


@register_runner("torch-pipelining-zbv", group="peer", launcher="torchrun", nprocs=2,
                 description="torch.distributed.pipelining ScheduleZBVZeroBubble, 2 chunks per rank in a V, gloo")
def run_torch_zbv(ctx: BenchContext) -> RankResult:
    return _run_virtual(ctx, "zbv")
