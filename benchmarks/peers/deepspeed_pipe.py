"""Peer: DeepSpeed's ``PipelineModule`` / ``PipelineEngine.train_batch`` on CPU over gloo.

The model is given to ``PipelineModule`` as a flat layer list built from the shared pieces of
:mod:`benchmarks.bench_model`::

    [TiedLayerSpec("wte", TokenEmbedding), PositionEmbedding, block0..3,      <- stage 0
     block4..7, ln_f, TiedLayerSpec("wte", TokenEmbedding, forward_fn=tied_lm_head)]  <- stage 1

with ``partition_method="uniform"`` (12 entries -> 6 + 6, asserted below, so the cut is the
benchmark's fixed one). The tie is DeepSpeed's own: both stages build the ``"wte"`` module,
DeepSpeed broadcasts its weight from the lowest rank at start-up and all-reduces its gradient
between the two stages before each optimizer step. The other layers are passed as ready-built
modules (allowed by ``PipelineModule``) taken from the seeded full model, which is what makes
their weights equal to every other runner's; ``LayerSpec``'s deferred construction would save
memory but build layers from a different RNG sequence.

Running it on a CPU-only machine (DeepSpeed 0.19.8):

* ``DS_ACCELERATOR=cpu`` selects the CPU accelerator without probing for CUDA (auto-detection
  also lands there, with a warning);
* ``OMP_NUM_THREADS=1`` must be set by the caller: the ``deepspeed`` launcher passes the
  environment through but sets no thread count, so each rank would otherwise use every core;
* ``deepspeed.init_distributed(dist_backend="gloo")``: the CPU accelerator prefers ``ccl`` and
  only falls back to gloo because oneCCL is not installed — naming gloo removes that dependency;
* a client optimizer (``torch.optim.AdamW``), so DeepSpeed builds none of its Adam extensions,
  and ``gradient_clipping: 0`` (see :func:`deepspeed_config`);
* the first start JIT-compiles DeepSpeed's ``deepspeed_shm_comm`` op into
  ``~/.cache/torch_extensions`` (minutes, once).

The driver launches it as ``deepspeed --num_gpus 2 --master_port PORT script ...`` (through
``python -m deepspeed.launcher.runner``, the same entry point). A harmless PyTorch warning,
"c10d::broadcast_: an autograd kernel was not registered", comes from DeepSpeed broadcasting
the tied weight in place at start-up; the gradients were checked equal to single-process ones.
"""

from __future__ import annotations

import torch

from benchmarks.bench_model import (
    TokenEmbedding,
    first_stage_body,
    last_stage_body,
    lm_loss,
    make_optimizer,
    tied_lm_head,
)
from benchmarks.peers.registry import BenchContext, RankResult, register_runner

#: Big enough that DeepSpeed's own periodic throughput print never fires during a run.
_NEVER = 10**9


def deepspeed_config(ctx: BenchContext) -> dict:
    """Pipeline engine config: micro-batch and M from the benchmark, no fp16/ZeRO, quiet.

    ``gradient_clipping`` must be set to 0 explicitly: DeepSpeed's default is 1.0, which
    silently scales this model's gradients (norm ~1.7 at init) and makes the run diverge
    from every other runner after the first update.
    """
    cfg = ctx.cfg
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.num_microbatches,
        "train_batch_size": cfg.samples_per_step * ctx.world_size // cfg.num_stages,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 0},
        "gradient_clipping": 0.0,
    }


@register_runner("deepspeed-pipe", group="peer", launcher="deepspeed", nprocs=2,
                 description="DeepSpeed PipelineModule + PipelineEngine.train_batch, gloo")
def run_deepspeed(ctx: BenchContext) -> RankResult:
    """Build the ``PipelineModule`` on each rank and time ``engine.train_batch``."""
    import deepspeed
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = ctx.cfg
    model = ctx.build_model()
    wte = model.transformer.wte.weight
    layers = [
        TiedLayerSpec("wte", TokenEmbedding, wte),
        *first_stage_body(model, cfg),
        *last_stage_body(model, cfg),
        TiedLayerSpec("wte", TokenEmbedding, wte, forward_fn=tied_lm_head),
    ]
    pipe = PipelineModule(layers=layers, num_stages=cfg.num_stages, loss_fn=lm_loss,
                          partition_method="uniform")
    expected = [0, 2 + cfg.blocks_per_stage, len(layers)]
    if list(pipe.parts) != expected:
        raise RuntimeError(f"DeepSpeed cut the model at {pipe.parts}, the benchmark needs {expected}")
    engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=make_optimizer(pipe.parameters(), cfg),
                                           config=deepspeed_config(ctx))
    is_last = engine.is_last_stage()

    def step(batch: torch.Tensor) -> float | None:
        # Every stage pulls M (inputs, labels) pairs; stage 0 uses the inputs, the last the labels.
        loss = engine.train_batch(iter([(mb, mb) for mb in ctx.microbatches(batch)]))
        return float(loss) if is_last else None

    return ctx.measure(step)
