"""The single-process baseline: the unmodified HF model, gradient accumulation, one thread.

Why it matters: it is the reference twice over. Its first-step loss is what every pipelined
runner must reproduce, and twice its throughput is the physical limit of two stages on two
cores (both cores busy, no bubble), against which the pipelined runners are ranked.
"""

from __future__ import annotations

import torch

from benchmarks.bench_model import lm_loss, make_optimizer
from benchmarks.peers.registry import BenchContext, RankResult, register_runner


@register_runner("single-process", group="baseline", launcher="python", nprocs=1,
                 description="GPT2LMHeadModel in one process, M-step gradient accumulation")
def run_single_process(ctx: BenchContext) -> RankResult:
    """Train the whole model in this process: M forward/backward passes, then one AdamW step."""
    model = ctx.build_model()
    optimizer = make_optimizer(model.parameters(), ctx.cfg)
    m = ctx.cfg.num_microbatches

    def step(batch: torch.Tensor) -> float:
        total = 0.0
        for mb in ctx.microbatches(batch):
            loss = lm_loss(model(input_ids=mb).logits, mb)
            (loss / m).backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total / m

    return ctx.measure(step)
