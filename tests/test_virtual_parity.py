"""Virtual-stage schedules (interleaved 1F1B, ZB-V, DualPipeV) end to end: the partitioner cuts
``P·v`` chunks, each rank runs its chunks under the schedule, and the loss and gradients match
one process running the whole model (fp32, 1e-5), with and without recomputation.

GPT-2 ties its embedding to the LM head: under the V placement both sit on rank 0 (one
Parameter, no reduction); under the loop placement on the first and the last rank (reduced
over the tie group). One process group per layout runs every schedule in turn.
"""

from __future__ import annotations

import pytest
import torch

from test_pipeline_parity import LR, MICRO, SEQ, global_batches, reference
from tiny_models import tiny_model

#: (schedule, recompute, chunks per rank).
CASES = [("interleaved_1f1b", "none", 2), ("interleaved_1f1b", "full", 2),
         ("zb_v", "none", 2), ("zb_v", "full", 2),
         ("dualpipe_v", "none", 2), ("dualpipe_v", "full", 2)]
STEPS = 3


def _pipeline(kind: str, pp: int, m: int, cases: list[tuple[str, str, int]]) -> dict:
    import merak
    from merak.partitioner import build_chunks, shard, trace
    from merak.runtime.memory.recompute_plan import RecomputePlan
    from merak.runtime.pipeline.executor import PipelineExecutor, all_reduce_mean_loss
    from merak.runtime.pipeline.schedule import build, placement_for, uses_weight_passes

    grid = merak.init(pp=pp)
    out = {}
    for schedule, recompute, chunks in cases:
        placement = placement_for(schedule, pp, chunks)
        model, make_batch = tiny_model(kind)  # same seed on every rank: same weights
        plan = shard(trace(model, make_batch(batch_size=MICRO, seq_len=SEQ, seed=0)), placement.num_virtual)
        stages = build_chunks(plan, placement.chunks_of(grid.stage_id))
        params = {id(p): p for s in stages for p in s.parameters()}
        grads: dict[str, torch.Tensor] = {}

        def keep_first_grads() -> None:  # keyed by the reference model's parameter names
            if grads:
                return
            for s in stages:
                canonical = {local: key for key, local in s.tied_parameters.items()}
                grads.update({canonical.get(n, n): p.grad.clone() for n, p in s.named_parameters()})

        ex = PipelineExecutor(stages, grid, torch.optim.SGD(params.values(), lr=LR),
                              zero_bubble=uses_weight_passes(schedule), before_optimizer_step=keep_first_grads,
                              placement=placement)
        instructions = build(schedule, pp, m, grid.stage_id, RecomputePlan.from_mode(recompute, pp), chunks)
        losses = [all_reduce_mean_loss(ex.run(instructions, global_batches(make_batch, m, step)).loss, grid)
                  for step in range(STEPS)]
        out[(schedule, recompute, chunks)] = (losses, grads)
    return out


LAYOUTS = [
    pytest.param("gpt2", 2, CASES, id="gpt2-pp2"),
    pytest.param("llama", 2, CASES, id="llama-pp2", marks=pytest.mark.slow),
    pytest.param("gpt2", 4, CASES, id="gpt2-pp4", marks=pytest.mark.slow),
    pytest.param("llama", 4, CASES, id="llama-pp4", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind, pp, cases", LAYOUTS)
def test_virtual_stages_match_single_process(dist_run, kind, pp, cases):
    m = 2 * pp  # the fewest micro-batches every virtual-stage schedule takes
    ref_losses, ref_grads = reference(kind, m, STEPS)
    per_rank = dist_run(_pipeline, pp, kind, pp, m, cases, timeout=900)
    for rank, results in enumerate(per_rank):
        seen = set()
        for key, (losses, grads) in results.items():
            torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, msg=f"{key} rank {rank}")
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6,
                                           msg=f"{key} rank {rank} grad of {name}")
            seen |= set(grads)
        assert seen, f"rank {rank} owns no parameters"
