"""The runner registry of the pipeline-throughput benchmark.

A *runner* is one way of training :mod:`benchmarks.bench_model` for a few steps: the
single-process baseline, a peer framework (DeepSpeed, ``torch.distributed.pipelining``) or one
of Merak's schedules. The benchmark driver launches each runner as its own job (``python``,
``torchrun`` or the ``deepspeed`` launcher, one OpenMP thread per rank) and calls the runner's
function once in every rank. The function gets a :class:`BenchContext` — the config, the seeded
model builder and the step batches, identical for everyone — and returns a :class:`RankResult`
with its per-step wall times and the losses it saw.

Why a registry and not a list in the driver: Merak's runners are written by the people who
write the executor, later, and adding one must be a single decorated function in its own module
(see :mod:`benchmarks.peers.merak_runners`) with no change to the driver, the table or the plot.

Adding a runner::

    @register_runner("merak-1f1b", group="merak", launcher="torchrun", nprocs=2,
                     description="Merak executor, 1F1B", unavailable=merak_unavailable)
    def run_merak_1f1b(ctx: BenchContext) -> RankResult:
        ...  # initialise the process group, build the stage from ctx.build_model()
        return ctx.measure(train_one_step)   # train_one_step(batch) -> loss or None
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from benchmarks.bench_model import BenchConfig, build_model, make_batches, microbatches
from benchmarks.common import time_calls

Group = Literal["baseline", "peer", "merak", "reference"]
Launcher = Literal["python", "torchrun", "deepspeed"]


@dataclass(frozen=True)
class RankResult:
    """What one rank measured.

    ``step_times``: seconds of each timed step (warm-up excluded).
    ``losses``: the step loss (mean over micro-batches) of *every* step, warm-up included, or
    ``None`` on ranks that do not see the loss (e.g. the first pipeline stage).
    ``cpu_times``: this process's CPU seconds in each timed step (a noise/idle diagnostic).
    """

    step_times: list[float]
    losses: list[float | None]
    cpu_times: list[float]


@dataclass(frozen=True)
class BenchContext:
    """What a runner function receives in each rank: the same model, data and config for all."""

    cfg: BenchConfig
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, cfg: BenchConfig) -> "BenchContext":
        """Rank information as set by ``torchrun`` or the ``deepspeed`` launcher (defaults: 1 proc)."""
        env = os.environ
        return cls(cfg, int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    def build_model(self) -> torch.nn.Module:
        """The full seeded ``GPT2LMHeadModel``; identical on every rank and in every runner."""
        return build_model(self.cfg)

    def batches(self) -> list[torch.Tensor]:
        """Token ids for warm-up + timed steps, one ``[micro_batch * M, seq]`` tensor each."""
        return make_batches(self.cfg, self.cfg.warmup_steps + self.cfg.steps)

    def microbatches(self, batch: torch.Tensor) -> list[torch.Tensor]:
        return microbatches(self.cfg, batch)

    def measure(self, step: Callable[[torch.Tensor], float | None]) -> RankResult:
        """Run ``step`` on every batch, timing all but the warm-up steps.

        ``step(batch)`` trains one full step (all micro-batches and the optimizer update) and
        returns the step loss if this rank knows it. When a process group is up, ranks meet at a
        barrier before the first timed step so every rank's window covers the same steps.
        """
        barrier = dist.barrier if dist.is_available() and dist.is_initialized() else None
        run = time_calls(step, self.batches(), self.cfg.warmup_steps, before_measuring=barrier)
        return RankResult(run.times, [None if r is None else float(r) for r in run.results], run.cpu_times)


RunnerFn = Callable[[BenchContext], RankResult]


def always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Runner:
    """A registered runner.

    ``unavailable()`` returns ``None`` when the runner can run here, otherwise the reason it
    cannot (shown in the table as a skip, never as a failure).
    """

    name: str
    fn: RunnerFn
    group: Group
    launcher: Launcher
    nprocs: int
    description: str
    unavailable: Callable[[], str | None] = field(default=always_available)


_RUNNERS: dict[str, Runner] = {}


def register_runner(name: str, *, group: Group, launcher: Launcher = "torchrun", nprocs: int = 2,
                    description: str = "", unavailable: Callable[[], str | None] = always_available,
                    ) -> Callable[[RunnerFn], RunnerFn]:
    """Decorator: register ``fn`` as runner ``name`` (names are unique; order = table order)."""

    def decorate(fn: RunnerFn) -> RunnerFn:
        if name in _RUNNERS:
            raise ValueError(f"runner {name!r} registered twice")
        if launcher == "python" and nprocs != 1:
            raise ValueError(f"runner {name!r}: the 'python' launcher runs exactly one process")
        summary = description or (fn.__doc__ or "").strip().split("\n")[0]
        _RUNNERS[name] = Runner(name, fn, group, launcher, nprocs, summary, unavailable)
        return fn

    return decorate


def runners() -> dict[str, Runner]:
    """All registered runners, in registration order."""
    return dict(_RUNNERS)
