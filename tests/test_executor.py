"""Executor: every schedule on hand-written stages (tied weight, skip value, non-tensor value)
reproduces single-process loss and gradients, over several optimizer steps, with dp 1 and 2.

The stage modules here are written by hand so that the executor is tested independently of
the partitioner; ``test_pipeline_parity.py`` repeats the check on partitioner-built stages of
real Hugging Face models.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from dist_harness import RankFailed
from reference import single_process_run

SCHEDULE_RECOMPUTE = [("gpipe", "none"), ("gpipe", "full"), ("1f1b", "none"), ("1f1b", "full"),
                      ("shifted_critical_path", "full"), ("shifted_critical_path", "stage_aware"),
                      ("zero_bubble", "none")]
M, STEPS, VOCAB = 4, 3, 11


class Full(nn.Module):
    """Embedding (tied with the head) → three tanh(Linear) blocks, with a long skip."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids, labels):
        h0 = self.emb(input_ids)
        h = torch.tanh(self.blocks[0](h0))
        h = torch.tanh(self.blocks[1](h))
        h = torch.tanh(self.blocks[2](h)) + h0
        return nn.functional.cross_entropy(self.head(h).reshape(-1, VOCAB), labels.reshape(-1))


class HandStage(nn.Module):
    """Stage 0: emb + block 0 (sends h, the skip h0 and an int); stage 1: the rest + loss."""

    def __init__(self, full: Full, stage_id: int) -> None:
        super().__init__()
        self.first = stage_id == 0
        if self.first:
            self.emb, self.b0 = full.emb, full.blocks[0]
            self.data_inputs, self.recv_inputs, self.send_outputs = ("input_ids",), (), ("h", "skip", "n")
            self.tied_parameters = {"emb.weight": "emb.weight"}
        else:
            self.b1, self.b2, self.head = full.blocks[1], full.blocks[2], full.head
            self.data_inputs, self.recv_inputs, self.send_outputs = ("labels",), ("h", "skip", "n"), ()
            self.tied_parameters = {"emb.weight": "head.weight"}

    def forward(self, data, received):
        if self.first:
            h0 = self.emb(data["input_ids"])
            return {"h": torch.tanh(self.b0(h0)), "skip": h0, "n": VOCAB}
        h = torch.tanh(self.b2(torch.tanh(self.b1(received["h"])))) + received["skip"]
        logits = self.head(h).reshape(-1, received["n"])
        return {"loss": nn.functional.cross_entropy(logits, data["labels"].reshape(-1))}


# Original parameter name of each stage-local name (the tie maps head.weight to emb.weight).
ORIGINAL = {"emb.weight": "emb.weight", "b0.weight": "blocks.0.weight", "b0.bias": "blocks.0.bias",
            "b1.weight": "blocks.1.weight", "b1.bias": "blocks.1.bias", "b2.weight": "blocks.2.weight",
            "b2.bias": "blocks.2.bias", "head.weight": "emb.weight"}


def global_batches(dp: int, step: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (dp * M, 2, 5), generator=g)
    labels = torch.randint(0, VOCAB, (dp * M, 2, 5), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(dp * M)]


def reference(dp: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    full = Full()
    return single_process_run(full, [global_batches(dp, step) for step in range(STEPS)],
                              torch.optim.SGD(full.parameters(), lr=0.5), loss_of=lambda m, b: m(**b))


def _pipeline(dp: int) -> dict:
    import merak
    from merak.runtime.pipeline.executor import PipelineExecutor, all_reduce_mean_loss
    from merak.runtime.memory.recompute_plan import RecomputePlan
    from merak.runtime.pipeline.schedule import build

    grid = merak.init(dp=dp, pp=2)
    results = {}
    for schedule, recompute in SCHEDULE_RECOMPUTE:
        stage = HandStage(Full(), grid.stage_id)
        grads = {}

        def keep_first_grads() -> None:
            if not grads:
                grads.update({ORIGINAL[n]: p.grad.clone() for n, p in stage.named_parameters()})

        ex = PipelineExecutor(stage, grid, torch.optim.SGD(stage.parameters(), lr=0.5),
                              zero_bubble=schedule == "zero_bubble",
                              before_optimizer_step=keep_first_grads)
        plan = RecomputePlan.from_mode(recompute, 2)
        instructions = build(schedule, 2, M, grid.stage_id, plan)
        losses = []
        for step in range(STEPS):
            mine = global_batches(dp, step)[grid.coord.dp * M:(grid.coord.dp + 1) * M]
            losses.append(all_reduce_mean_loss(ex.run(instructions, mine).loss, grid))
        results[(schedule, recompute)] = (losses, grads)
    return results


@pytest.mark.parametrize("dp", [1, 2])
def test_every_schedule_matches_single_process(dist_run, dp):
    ref_losses, ref_grads = reference(dp)
    per_rank = dist_run(_pipeline, 2 * dp, dp, timeout=240)
    for rank, results in enumerate(per_rank):
        for key, (losses, grads) in results.items():
            torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0, msg=f"{key} rank {rank}")
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7,
                                           msg=f"{key} rank {rank} grad {name}")


def _one_stage_dies() -> None:
    import merak
    from merak.runtime.pipeline.executor import PipelineExecutor
    from merak.runtime.pipeline.schedule import build

    grid = merak.init(pp=2, timeout_s=60)
    ex = PipelineExecutor(HandStage(Full(), grid.stage_id), grid, timeout_s=10)
    if grid.stage_id == 1:
        time.sleep(2)
        os._exit(3)  # a crashed stage: stage 0 must report, not hang
    ex.run(build("1f1b", 2, M, 0), global_batches(1, 0))


def test_killed_stage_gives_timeout_error_not_hang(dist_run):
    start = time.monotonic()
    with pytest.raises(RankFailed) as info:
        dist_run(_one_stage_dies, 2, timeout=120)
    assert time.monotonic() - start < 90
    assert info.value.rank == 0 and info.value.exc_type == "P2PTimeoutError"
    assert "rank 0" in info.value.message and "gradients of micro-batch 0 from rank 1" in info.value.message


def test_receives_are_prefetched_one_receiving_group_ahead():
    from merak.runtime.pipeline.executor import _receives_ahead
    from merak.runtime.pipeline.instructions import parse_schedule
    from merak.runtime.pipeline.replay import groups_of

    # 1F1B's last stage of two: each receive is posted right after the previous receiving group
    # ran, so it overlaps the compute in between; a grouped exchange counts as one group
    ops = parse_schedule("1L0 1RA0 1F0 1B0 1SG0+ 1RA1 1F1 1B1 1SG1")
    ahead = _receives_ahead(ops, groups_of(ops))
    assert {g: [str(ops[p]) for p in ps] for g, ps in ahead.items()} == {0: ["1RA0"], 2: ["1RA1"]}
