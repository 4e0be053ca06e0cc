"""Run a function on N gloo ranks in subprocesses, with a hard timeout.

Every multi-process test goes through :func:`run_distributed` (exposed to tests as the
``dist_run`` fixture in ``conftest.py``), so process start-up, environment, timeouts and
error reporting are the same everywhere:

* each rank gets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` exactly
  as torchrun would set them, and ``OMP_NUM_THREADS=1`` (2-core machines run 8 ranks);
* the call returns every rank's return value, in rank order;
* if a rank raises, the exception is re-raised in the test as :class:`RankFailed` naming the
  rank and carrying its traceback. After a first failure the other ranks get ``grace`` seconds
  to report their own errors, and a raised exception is preferred to a silent process death
  (a dead stage's neighbour explains more than the corpse does);
* if a rank hangs past ``timeout`` all are killed and :class:`RanksTimedOut` names the ranks
  that never finished.

``fn`` must be importable by the children (a module-level function in a test module).

Ranks start from a *fork server* that has already imported torch and transformers' Trainer
(``_START_METHOD``): a spawned rank spends ~3 s of CPU importing them, and the default suite
starts several hundred ranks on a 2-core machine, so start-up was most of its run time. A
fork-server child is still a fresh process (forked from a server that never ran a test), and it
receives the parent's *current* environment, exactly as a spawned child would.
``MERAK_TEST_START=spawn`` restores plain spawning (e.g. to rule the fork server out).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable


class RankFailed(AssertionError):
    def __init__(self, rank: int, tb: str, exc_type: str, message: str) -> None:
        super().__init__(f"rank {rank} raised {exc_type}: {message}\n--- rank {rank} traceback ---\n{tb}")
        self.rank, self.exc_type, self.message = rank, exc_type, message


class RanksTimedOut(AssertionError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Heavy imports every rank needs; loaded once by the fork server, never by a test's own code.
_PRELOAD = ["torch", "torch.distributed", "transformers", "transformers.trainer"]


def _context() -> Any:
    """The multiprocessing context ranks start from (see the module docstring)."""
    if os.environ.get("MERAK_TEST_START", "forkserver") == "spawn":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _child(fn: Callable, rank: int, world: int, port: int, env: dict, args: tuple,
           kwargs: dict, results: mp.Queue) -> None:
    # The fork server's environment is the one it started with; the test's is the one that counts.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        # Plain pickle bytes: tensors must not travel as shared-memory handles that die with
        # this process before the parent reads them.
        results.put((rank, "ok", pickle.dumps(fn(*args, **kwargs))))
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
        results.put((rank, "error", (traceback.format_exc(), type(exc).__name__, str(exc))))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    grace: float = 20.0,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return results in rank order."""
    ctx = _context()
    results: mp.Queue = ctx.Queue()
    port = free_port()
    child_env = {**os.environ, **(env or {})}
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, child_env, args, kwargs, results),
                    daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, Any]] = {}
    errors: list[RankFailed] = []  # in the order they happened
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if errors:
                    break
                missing = sorted(set(range(world_size)) - set(outcome))
                raise RanksTimedOut(
                    f"ranks {missing} did not finish within {timeout:.0f}s "
                    f"(finished: {sorted(outcome)})"
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                for r, p in enumerate(procs):
                    if p.exitcode is not None and r not in outcome:
                        outcome[r] = ("died", p.exitcode)
                        errors.append(RankFailed(r, "", "ProcessDied",
                                                 f"exit code {p.exitcode} without reporting"))
                continue
            if status == "ok":
                outcome[rank] = (status, pickle.loads(payload))
            else:
                outcome[rank] = (status, payload)
                errors.append(RankFailed(rank, *payload))
            if errors:
                # The first failure is often a consequence elsewhere (a dead peer): give the
                # other ranks a short grace period to report their own, more telling, errors.
                deadline = min(deadline, time.monotonic() + grace)
        if errors:
            reported = [e for e in errors if e.exc_type != "ProcessDied"]
            raise (reported or errors)[0]
    finally:
        for p in procs:
            p.join(timeout=5 if len(outcome) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [outcome[r][1] for r in range(world_size)]
