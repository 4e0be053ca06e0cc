"""MerakTrainer's step period and its loop overhead on the throughput benchmark's model.

GPT-2 (8 blocks, H=256, seq 128, vocab 2048), micro-batch 4, M=8, pp=2, 1f1b, a uniform cut,
14 steps (the first 2 not counted). Prints the median period between consecutive
``on_step_end`` events (everything a step costs: data, schedule, loss all-reduce, scheduler,
callbacks, logging) and the median time of that period spent *outside* ``PipelineExecutor.run``
(what the HF training loop around the pipeline adds). Run it under two checkouts to compare
trainer loops::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/trainer_step.py
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

import merak
from merak.runtime.pipeline.executor import PipelineExecutor

STEPS, SKIPPED = 14, 2


def _time_executor_runs() -> list[float]:
    """Seconds of every ``PipelineExecutor.run`` call of this process (patched class-wide)."""
    seconds: list[float] = []
    run = PipelineExecutor.run

    def timed(self: PipelineExecutor, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return run(self, *args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    PipelineExecutor.run = timed  # type: ignore[method-assign]
    return seconds


class StepPeriods(TrainerCallback):
    """Periods between consecutive ``on_step_end`` events."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())

    @property
    def periods(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def main() -> None:
    torch.set_num_threads(1)
    runs = _time_executor_runs()
    merak.init(pp=2)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=8, n_embd=256, n_head=8, n_positions=128, vocab_size=2048,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(32 * STEPS):
        ids = torch.randint(0, 2048, (128,), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    args = merak.MerakArguments(output_dir="/tmp/merak-trainer-step", per_device_train_batch_size=4,
                                gradient_accumulation_steps=8, max_steps=STEPS, logging_steps=1, save_strategy="no",
                                report_to="none", disable_tqdm=True, learning_rate=1e-4, schedule="1f1b",
                                partition_method="uniform", log_level="warning")
    periods = StepPeriods()
    merak.MerakTrainer(GPT2LMHeadModel(config), args, train_dataset=data, callbacks=[periods]).train()
    if int(os.environ.get("RANK", 0)) == 0:
        steps = periods.periods  # period i holds executor run i + 1
        outside = [p - r for p, r in zip(steps, runs[-len(steps):])][SKIPPED:]
        median = statistics.median(steps[SKIPPED:])
        print(f"step period: median {median * 1e3:.1f} ms, min {min(steps[SKIPPED:]) * 1e3:.1f} ms "
              f"({32 / median:.2f} samples/s); outside executor.run: median {statistics.median(outside) * 1e3:.2f} ms",
              flush=True)


if __name__ == "__main__":
    main()
