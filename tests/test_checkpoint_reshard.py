"""Checkpoints resumed under another layout (issue 18): the loss curve goes on as if uninterrupted.

A job of layout A trains ``STEPS`` steps of a tiny GPT-2 (fp32, AdamW, warm-up/decay scheduler)
and saves a checkpoint before step ``SAVE_AT``; a job of layout B loads it and trains the
remaining steps. Both see the same global batches (``G`` micro-batches per step, split over the
data-parallel replicas), so B's losses must equal A's (1e-5 relative: the layouts reduce in
other orders). Layout A's optimizer is ZeRO-1 where dp > 1, so its states come back from shards.
The default run keeps tp=2 -> tp=1 (tensor-parallel shards re-assembled, world 2 -> 1) with an
asynchronous save; the others are slow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dist_harness import run_distributed
from tiny_models import tiny_model

MICRO, SEQ, G, STEPS, SAVE_AT, LR = 2, 8, 4, 5, 2, 1e-2


def _global_batch(make_batch: Any, step: int) -> list[dict[str, torch.Tensor]]:
    return [make_batch(batch_size=MICRO, seq_len=SEQ, seed=1000 + step * G + i) for i in range(G)]


def train_job(dims: dict[str, int], resume_from: str | None, zero: bool, save_at: dict[int, str],
              async_save: bool = False, export_to: str | None = None, schedule: str = "1f1b",
              dropout: float = 0.0, rng_probe: str | None = None) -> list[float]:
    """One rank of a job of layout ``dims`` that resumes from ``resume_from`` (or starts fresh)
    and saves a checkpoint to ``save_at[step]`` before each step listed there; returns the global
    loss of every step it ran. ``zero``: ZeRO-1 optimizer states. ``async_save``: the saves are
    written in the background while the next steps train, and waited for at the end.
    ``export_to``: a Hugging Face export at the end (each stage writes its shard). ``schedule``:
    a virtual-stage one builds this rank's model chunks (interleaved_1f1b: two per rank).
    ``dropout``: every dropout of the GPT-2 at that rate. ``rng_probe``: each rank writes its
    random streams (:func:`merak.rng_streams.capture`) to ``<rng_probe>.<saved|loaded>.<coord>.pt``
    as it saves a checkpoint and right after it loads one."""
    from transformers import get_linear_schedule_with_warmup

    import merak
    from merak.checkpoint import export_pretrained, load_checkpoint, save_checkpoint
    from merak.partitioner import StageChunks, build_chunks, build_stage, shard, trace
    from merak.rng_streams import capture, coord_name
    from merak.runtime.memory.recompute_plan import RecomputePlan
    from merak.runtime.memory.zero import shard_optimizer_states
    from merak.runtime.pipeline.executor import PipelineExecutor, all_reduce_mean_loss
    from merak.runtime.pipeline.schedule import build, placement_for, uses_weight_passes
    from merak.runtime.tensor_parallel import apply_tensor_parallel, plan_tensor_parallel

    grid = merak.init(**dims)
    dp, pp = grid.dims.dp, grid.dims.pp
    model, make_batch = tiny_model("gpt2", embd_pdrop=dropout, resid_pdrop=dropout, attn_pdrop=dropout)
    graph = trace(model, make_batch(batch_size=MICRO, seq_len=SEQ, seed=0))
    placement = placement_for(schedule, pp, 2 if schedule == "interleaved_1f1b" else None)
    seed = 7 if resume_from else 1234
    plan = shard(graph, placement.num_virtual)
    if placement.num_chunks > 1:
        stage = StageChunks(build_chunks(plan, placement.chunks_of(grid.stage_id), seed=seed))
    else:
        stage = build_stage(plan, grid.stage_id, seed=seed)
    if grid.dims.tp > 1:
        apply_tensor_parallel(stage, grid, plan_tensor_parallel(graph, grid.dims.tp))
    optimizer = torch.optim.AdamW(stage.parameters(), lr=LR, weight_decay=0.1)
    if zero:
        optimizer = shard_optimizer_states(optimizer, grid.dp_group, dp)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=STEPS)
    state = {"stage": stage, "grid": grid, "optimizer": optimizer, "lr_scheduler": scheduler}

    def probe(event: str) -> None:
        if rng_probe:
            torch.save(capture(stage), f"{rng_probe}.{event}.{coord_name(grid.coord)}.pt")

    start = load_checkpoint(resume_from, **state)["global_step"] if resume_from else 0
    if resume_from:
        probe("loaded")
    micro = G // dp
    executor = PipelineExecutor(list(stage.chunks) if placement.num_chunks > 1 else stage, grid, optimizer,
                                zero_bubble=uses_weight_passes(schedule), placement=placement)
    instructions = build(schedule, pp, micro, grid.stage_id, RecomputePlan.from_mode("none", pp), placement.num_chunks)
    losses, pending = [], []
    for step in range(start, STEPS):
        if step in save_at:
            probe("saved")
            pending.append(save_checkpoint(save_at[step], **state, extra={"global_step": step}, async_save=async_save))
        batches = _global_batch(make_batch, step)[grid.coord.dp * micro:(grid.coord.dp + 1) * micro]
        losses.append(all_reduce_mean_loss(executor.run(instructions, batches).loss, grid))
        scheduler.step()
    for save in pending:
        if save is not None:
            save.wait()
    if export_to:
        export_pretrained(export_to, stage=stage, grid=grid, model=tiny_model("gpt2", meta=True)[0])
        if grid.coord.dp == 0 and grid.coord.tp == 0:  # what the export must hold
            torch.save(stage.state_dict(), f"{export_to}.stage{grid.stage_id}.pt")
    merak.shutdown()
    return losses


def _world(dims: dict[str, int]) -> int:
    return dims.get("dp", 1) * dims.get("tp", 1) * dims.get("pp", 1)


def _check(tmp_path: Path, before: dict[str, int], after: dict[str, int], async_save: bool = False,
           export_to: str | None = None, schedules: tuple[str, str] = ("1f1b", "1f1b")) -> None:
    zero, ckpt = before.get("dp", 1) > 1, str(tmp_path / "ckpt")
    first = run_distributed(train_job, _world(before), before, None, zero, {SAVE_AT: ckpt}, async_save, None,
                            schedules[0], timeout=300)[0]
    resumed = run_distributed(train_job, _world(after), after, ckpt, False, {}, False, export_to, schedules[1],
                              timeout=300)[0]
    assert len(set(first)) == len(first), "the model did not train"
    assert resumed == pytest.approx(first[SAVE_AT:], rel=1e-5, abs=0)


def test_tp2_resumes_at_tp1_from_an_async_save(tmp_path):
    # the save is written in the background while the next steps change the weights
    _check(tmp_path, {"tp": 2}, {"tp": 1}, async_save=True)


@pytest.mark.slow
def test_pp2_resumes_at_pp4_and_exports_four_shards(tmp_path):
    from transformers import AutoModelForCausalLM

    _check(tmp_path, {"pp": 2}, {"pp": 4}, export_to=str(tmp_path / "export"))
    export = tmp_path / "export"
    assert sorted(p.name for p in export.glob("*.safetensors")) == [
        f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)]
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.lm_head.weight is model.transformer.wte.weight
    exported = model.state_dict()
    for stage_id in range(4):
        for name, value in torch.load(f"{export}.stage{stage_id}.pt").items():
            assert torch.equal(exported[name], value), f"stage {stage_id}: {name}"


@pytest.mark.slow
def test_dp2_pp2_zero_resumes_at_tp2_pp2(tmp_path):
    _check(tmp_path, {"dp": 2, "pp": 2}, {"tp": 2, "pp": 2})


@pytest.mark.parametrize("schedules", [
    pytest.param(("1f1b", "interleaved_1f1b"), id="1f1b-to-interleaved"),
    pytest.param(("interleaved_1f1b", "1f1b"), id="interleaved-to-1f1b", marks=pytest.mark.slow),
    pytest.param(("zb_v", "interleaved_1f1b"), id="zb_v-to-interleaved", marks=pytest.mark.slow)])
def test_pp2_resumes_under_another_schedule_and_chunk_count(tmp_path, schedules):
    """Tensors are keyed by the model's names, not by stage or chunk: a pp=2 checkpoint of one
    schedule resumes under another that cuts the model into 2 or 4 chunks (the tied embedding
    moves between ranks), with the optimizer states, scheduler and step carried."""
    _check(tmp_path, {"pp": 2}, {"pp": 2}, schedules=schedules)
