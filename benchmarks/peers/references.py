"""Reference runners: a peer given one of Merak's environment settings, to show what it is worth.

Not peers (the "× fastest peer" ratio ignores them): users run the peers with their defaults.
They are here so the table separates what Merak gains from its defaults - on CPU,
:func:`merak.init` keeps freed host memory for reuse (:mod:`merak.runtime.memory.host_allocator`), and
stages run fused kernels for traced op chains (:mod:`merak.partitioner.fusion`) - from what it
gains by its schedule and partition: a peer given the allocator setting, and Merak without fusion.
"""

from __future__ import annotations

from benchmarks.peers.deepspeed_pipe import run_deepspeed
from benchmarks.peers.merak_runners import merak_unavailable, run_merak
from benchmarks.peers.registry import BenchContext, RankResult, register_runner


@register_runner("deepspeed-pipe+kept-host-memory", group="reference", launcher="deepspeed", nprocs=2,
                 description="DeepSpeed PipelineEngine with Merak's CPU host-allocator policy applied first")
def run_deepspeed_kept_host_memory(ctx: BenchContext) -> RankResult:
    """``deepspeed-pipe`` after :func:`~merak.runtime.memory.host_allocator.keep_freed_host_memory`."""
    from merak.runtime.memory.host_allocator import keep_freed_host_memory

    keep_freed_host_memory()
    return run_deepspeed(ctx)


@register_runner("merak-1f1b-unfused", group="reference", launcher="torchrun", nprocs=2,
                 description="Merak 1F1B with fuse_ops=False (traced GELU chain left as 8 ops, causal mask "
                             "built and passed to SDPA)",
                 unavailable=merak_unavailable)
def run_merak_1f1b_unfused(ctx: BenchContext) -> RankResult:
    """``merak-1f1b`` without the graph rewrites of :mod:`merak.partitioner.fusion`."""
    return run_merak(ctx, "1f1b", fuse=False)
