"""Merak's runners — registration points for the executor, skipped until it exists.

Each Merak schedule the benchmark compares is one entry here. Until ``merak.runtime.executor``
can be imported, :func:`merak_unavailable` reports "not available yet" and the driver lists the
entry as skipped (not failed). Once the executor lands, wiring it in means writing the body of
:func:`run_merak` — nothing else in the benchmark changes. The contract it must keep:

* run in each of the 2 ranks started by ``torchrun`` (gloo, one OpenMP thread per rank);
* build the model with ``ctx.build_model()`` and cut it at the benchmark's fixed point (stage 0:
  embeddings + blocks 0–3; stage 1: blocks 4–7, ``ln_f``, tied LM head) — e.g. with
  :func:`benchmarks.bench_model.stage_module`, or Merak's partitioner with a manual plan —
  and train with :func:`benchmarks.bench_model.make_optimizer` and
  :func:`benchmarks.bench_model.lm_loss` (per-micro-batch mean, gradients of the step mean);
* feed ``ctx.microbatches(batch)`` in order and return ``ctx.measure(step)``, where
  ``step(batch)`` runs one whole schedule (all M micro-batches, tied-gradient reduction,
  optimizer step) and returns the step's mean loss on the rank that has it, else ``None``.

The driver then checks the first-step loss against the single-process baseline and ranks the
throughput against the fastest peer.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from benchmarks.peers.registry import BenchContext, RankResult, register_runner

#: Set to True by whoever implements :func:`run_merak` against the real executor.
WIRED = False


def merak_unavailable() -> str | None:
    """Why Merak's runners cannot run yet, or ``None`` once they can."""
    try:
        found = importlib.util.find_spec("merak.runtime.executor") is not None
    except ImportError:
        found = False
    if not found:
        return "not available yet: merak.runtime.executor does not exist"
    if not WIRED:
        return "not available yet: benchmarks/peers/merak_runners.py:run_merak is not wired to the executor"
    return None


def run_merak(ctx: BenchContext, schedule: str) -> RankResult:
    """Train with Merak's executor and schedule ``schedule``; see the module docstring."""
    # MERAK EXECUTOR GOES HERE: build the stage, schedule.build(schedule, ...), then
    # return ctx.measure(lambda batch: <executor.run one step; return loss or None>).
    raise NotImplementedError(f"Merak runner for schedule {schedule!r} is not wired yet")


def _merak_entry(schedule: str) -> Callable[[BenchContext], RankResult]:
    def run(ctx: BenchContext) -> RankResult:
        return run_merak(ctx, schedule)

    run.__name__ = f"run_merak_{schedule}"
    return run


# ---- registration points: one line per Merak schedule in the comparison ----
for _schedule, _what in [("1f1b", "Merak executor, 1F1B"),
                         ("shifted_critical_path", "Merak executor, shifted critical path"),
                         ("zero_bubble", "Merak executor, zero bubble (ZB-H1)")]:
    register_runner(f"merak-{_schedule}", group="merak", launcher="torchrun", nprocs=2,
                    description=_what, unavailable=merak_unavailable)(_merak_entry(_schedule))
