"""End to end: partitioner-built stages of real HF models under every schedule and DP degree
reproduce the single-process loss and gradients (fp32) and track its loss curve over steps.

One process group per layout runs every schedule in turn (process start-up dominates on CPU).
The reference is the same model in one process, fed the same global batch: the mean of the
micro-batch losses, whose gradient is what the pipeline accumulates.
"""

from __future__ import annotations

import pytest
import torch

from reference import single_process_run
from tiny_models import tiny_model

SCHEDULE_RECOMPUTE = [("gpipe", "none"), ("1f1b", "none"), ("1f1b", "full"),
                      ("shifted_critical_path", "full"), ("shifted_critical_path", "stage_aware"),
                      ("zero_bubble", "none")]
MICRO, SEQ, STEPS, LR = 2, 8, 5, 0.05


def global_batches(make_batch, num: int, step: int) -> list[dict[str, torch.Tensor]]:
    return [make_batch(batch_size=MICRO, seq_len=SEQ, seed=1000 * step + i) for i in range(num)]


def reference(kind: str, num_microbatches: int, num_steps: int = STEPS) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process's losses and final gradients on the batches every parallel layout sees."""
    model, make_batch = tiny_model(kind)
    steps = [global_batches(make_batch, num_microbatches, step) for step in range(num_steps)]
    return single_process_run(model, steps, torch.optim.SGD(model.parameters(), lr=LR))


def _pipeline(kind: str, dp: int, pp: int, m: int) -> dict:
    import merak
    from merak.partitioner import build_stage, shard, trace
    from merak.runtime.pipeline.executor import PipelineExecutor, all_reduce_mean_loss
    from merak.runtime.memory.recompute_plan import RecomputePlan
    from merak.runtime.pipeline.schedule import build

    grid = merak.init(dp=dp, pp=pp)
    out = {}
    for schedule, recompute in SCHEDULE_RECOMPUTE:
        model, make_batch = tiny_model(kind)  # same seed on every rank: same weights
        plan = shard(trace(model, make_batch(batch_size=MICRO, seq_len=SEQ, seed=0)), pp)
        stage = build_stage(plan, grid.stage_id)
        grads: dict[str, torch.Tensor] = {}
        canonical = {local: key for key, local in stage.tied_parameters.items()}

        def keep_first_grads() -> None:  # keyed by the reference model's parameter names
            if not grads:
                grads.update({canonical.get(n, n): p.grad.clone() for n, p in stage.named_parameters()})

        ex = PipelineExecutor(stage, grid, torch.optim.SGD(stage.parameters(), lr=LR),
                              zero_bubble=schedule == "zero_bubble",
                              before_optimizer_step=keep_first_grads)
        instructions = build(schedule, pp, m, grid.stage_id, RecomputePlan.from_mode(recompute, pp))
        losses = []
        for step in range(STEPS):
            mine = global_batches(make_batch, dp * m, step)[grid.coord.dp * m:(grid.coord.dp + 1) * m]
            losses.append(all_reduce_mean_loss(ex.run(instructions, mine).loss, grid))
        out[(schedule, recompute)] = (losses, grads)
    return out


LAYOUTS = [
    pytest.param("gpt2", 2, 2, id="gpt2-dp2-pp2"),
    pytest.param("llama", 1, 4, id="llama-dp1-pp4"),
    pytest.param("gpt2", 1, 4, id="gpt2-dp1-pp4", marks=pytest.mark.slow),
    pytest.param("llama", 2, 2, id="llama-dp2-pp2", marks=pytest.mark.slow),
    pytest.param("gpt2", 2, 4, id="gpt2-dp2-pp4", marks=pytest.mark.slow),
    pytest.param("llama", 2, 4, id="llama-dp2-pp4", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind, dp, pp", LAYOUTS)
def test_layout_matches_single_process(dist_run, kind, dp, pp):
    m = max(4, pp)
    ref_losses, ref_grads = reference(kind, dp * m)
    per_rank = dist_run(_pipeline, dp * pp, kind, dp, pp, m, timeout=900)
    for rank, results in enumerate(per_rank):
        seen = set()
        for key, (losses, grads) in results.items():
            torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, msg=f"{key} rank {rank}")
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6,
                                           msg=f"{key} rank {rank} grad of {name}")
            seen |= set(grads)
        assert seen, f"rank {rank} owns no parameters"
