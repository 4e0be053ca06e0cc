"""MerakArguments(auto_parallel=True): the simulator picks the layout; training is unchanged."""

from __future__ import annotations

import pytest
import torch

from merak.auto_parallel import choose_layout
from merak.partitioner import trace
from merak.planner.cluster import Cluster, Device, Link
from tiny_models import tiny_model


def _cpu_cluster(devices: int, memory_bytes: float) -> Cluster:
    device = Device("test-cpu", 50e9, memory_bytes, 10e9, reserved_bytes=0.0, op_overhead_s=5e-6)
    link = Link(1e9, 1e-4)
    return Cluster(device, 1, devices, link, link)


def _graph(batch: int = 2, seq: int = 16):
    model, make_batch = tiny_model("gpt2")
    return trace(model, {k: v.to("meta") for k, v in make_batch(batch_size=batch, seq_len=seq).items()})


def test_choice_fills_the_devices_and_fits_memory() -> None:
    choice = choose_layout(_graph(), seq_len=16, trace_batch=2, global_batch=16,
                           cluster=_cpu_cluster(4, 2**30))
    assert choice.dp * choice.tp * choice.pp == 4
    assert choice.micro_batch * choice.num_microbatches * choice.dp == 16
    assert choice.peak_memory_bytes <= 2**30
    assert choice.table.count("\n") >= 1 and "dp" in choice.table  # the top layouts, for the log


def test_virtual_stage_schedules_are_searched_with_everything_the_trainer_runs() -> None:
    from merak.planner.search import SearchSpace, _strategies
    from merak.planner.simulator import TracedModel

    model = TracedModel("gpt2", _graph(), 16, trace_batch=2)
    space = SearchSpace(schedules=("1f1b", "zb_v", "interleaved_1f1b"), micro_batches=(2,))
    found = {(s.schedule, s.tp, s.recompute) for s in _strategies(model, _cpu_cluster(4, 2**30), 16, space)}
    assert ("zb_v", 1, "full") in found and ("interleaved_1f1b", 1, "none") in found
    assert ("zb_v", 2, "none") in found  # tensor parallelism runs per chunk
    # stage-aware recomputation is sized per chunk (with or without a budget)
    assert ("zb_v", 1, "stage_aware") in found and ("interleaved_1f1b", 1, "stage_aware") in found
    assert ("1f1b", 2, "stage_aware") in found


def test_no_fitting_layout_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="no layout .* fits"):
        choose_layout(_graph(), seq_len=16, trace_batch=2, global_batch=16, cluster=_cpu_cluster(4, 1e4))


SEQ, MICRO, ACCUM, STEPS = 16, 2, 4, 3


def _samples(make_batch, n: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v[0] for k, v in make_batch(batch_size=1, seq_len=SEQ, seed=i).items()} for i in range(n)]


def _train_auto() -> tuple[tuple[int, int, int], list[float], int]:
    import merak

    model, make_batch = tiny_model("gpt2")
    args = merak.MerakArguments(
        output_dir="/tmp/merak-test-auto", auto_parallel=True, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM, max_steps=STEPS, logging_steps=1, learning_rate=1e-2,
        seed=7, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = merak.MerakTrainer(model, args, train_dataset=_samples(make_batch, 64))
    trainer.train()
    grid = merak.get_grid()
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * grid.dims.dp
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return (grid.dims.dp, grid.dims.tp, grid.dims.pp), losses, global_batch


def test_trainer_plans_its_own_layout_and_keeps_the_loss_curve(dist_run) -> None:
    from merak.data import StepBatches
    from reference import single_process_run
    from transformers import default_data_collator, get_linear_schedule_with_warmup

    results = dist_run(_train_auto, 2, timeout=600)
    layouts = {r[0] for r in results}
    assert len(layouts) == 1, f"ranks disagree on the layout: {results}"
    dp, tp, pp = layouts.pop()
    assert dp * tp * pp == 2
    global_batch = results[0][2]
    assert global_batch == MICRO * ACCUM * 2  # HF's global batch, kept whatever the layout
    # Single-process reference on the same samples per step (data order is layout invariant).
    model, make_batch = tiny_model("gpt2")
    batches = StepBatches(_samples(make_batch, 64), default_data_collator, global_batch, 1, 1, 0, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ref, _ = single_process_run(model, [batches.microbatches(s) for s in range(STEPS)], opt,
                                scheduler=get_linear_schedule_with_warmup(opt, 0, STEPS))
    for _, losses, _ in results:
        torch.testing.assert_close(losses, ref, rtol=2e-5, atol=2e-6)
