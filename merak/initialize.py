"""``merak.init``: join the job that the launcher started and build the 3D grid.

Validation happens *before* any collective, so a wrong ``dp*tp*pp`` fails fast on every rank
with the same message instead of hanging in a group creation that can never complete.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from merak.launch.env import LaunchEnv, read_launch_env
from merak.logs import configure as configure_logging
from merak.runtime.distributed.grid import Grid, GridError, ParallelDims
from merak.runtime.memory.host_allocator import keep_freed_host_memory

logger = logging.getLogger("merak")

#: Default for every distributed wait (p2p and collectives). Overridable per call of init and
#: by ``MERAK_TIMEOUT_S`` so a hung job reports instead of waiting for the 30-minute default.
DEFAULT_TIMEOUT_S = float(os.environ.get("MERAK_TIMEOUT_S", 300))

_GRID: Grid | None = None
_DEVICE: torch.device | None = None


def _pick_backend_and_device(local_rank: int) -> tuple[str, torch.device]:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return "nccl", torch.device("cuda", torch.cuda.current_device())
    return "gloo", torch.device("cpu")


def init(
    *,
    dp: int = 1,
    tp: int = 1,
    pp: int = 1,
    backend: str | None = None,
    timeout_s: float | None = None,
) -> Grid:
    """Initialize ``torch.distributed`` (if needed) and build the process grid.

    Reads the environment set by torchrun, the deepspeed launcher or SLURM; chooses ``nccl``
    with CUDA and ``gloo`` otherwise. Calling it again with the same degrees returns the
    existing grid; other degrees raise :class:`GridError`.
    """
    global _GRID, _DEVICE
    dims = ParallelDims(dp=dp, tp=tp, pp=pp)
    if _GRID is not None:
        if _GRID.dims != dims:
            raise GridError(
                f"merak.init was already called with {_GRID.dims}; it cannot be called again "
                f"with {dims}. Call it once per process (or call merak.shutdown() first)."
            )
        return _GRID

    env = read_launch_env()
    world = dist.get_world_size() if dist.is_initialized() else env.world_size
    dims.validate(world)  # before any collective: a bad layout must not hang

    device, timeout = join_job(backend=backend, timeout_s=timeout_s)
    _GRID = Grid.build(dims, timeout=timeout)
    _DEVICE = device
    configure_logging(_GRID.rank)
    logger.debug("merak.init: %s (launcher: %s)", _GRID.describe(), env.launcher)
    return _GRID


def join_job(*, backend: str | None = None, timeout_s: float | None = None) -> tuple[torch.device, datetime.timedelta]:
    """Create the default process group from the launcher's environment (if none exists yet) and
    pick the local device, without building a grid: ``auto_parallel`` needs the ranks to talk
    before it knows the layout. Returns the device and the collective timeout."""
    env = read_launch_env()
    default_backend, device = _pick_backend_and_device(env.local_rank)
    if device.type == "cpu":
        keep_freed_host_memory()  # CPU training: reuse freed activation memory (no page faults)
    timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
    if not dist.is_initialized():
        if env.world_size == 1:
            # A one-process group keeps every code path identical to the distributed one.
            dist.init_process_group(
                backend or default_backend, store=dist.HashStore(), rank=0, world_size=1,
                timeout=timeout,
            )
        elif "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend or default_backend, store=_elastic_store(env, timeout), rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)
        else:
            dist.init_process_group(
                backend or default_backend,
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
                timeout=timeout,
            )
    return device, timeout


def _elastic_store(env: LaunchEnv, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store under torchrun, with one key prefix per restart attempt.

    Why: torchrun's workers share the agent's store, which outlives a restart (``--max-restarts``);
    without a prefix, the restarted workers' gloo rendezvous reads the dead attempt's addresses
    and fails with "connection refused" instead of resuming from the last checkpoint.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=not agent and env.rank == 0,
                          timeout=timeout)
    return dist.PrefixStore(f"merak/attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def is_initialized() -> bool:
    """Whether :func:`init` built a grid in this process."""
    return _GRID is not None


def get_grid() -> Grid:
    """The grid built by :func:`init`."""
    if _GRID is None:
        raise RuntimeError("merak.get_grid() called before merak.init(dp=..., tp=..., pp=...)")
    return _GRID


def get_device() -> torch.device:
    """The local device chosen by :func:`init` (``cuda:LOCAL_RANK`` or ``cpu``)."""
    if _DEVICE is None:
        raise RuntimeError("merak.get_device() called before merak.init(...)")
    return _DEVICE


def shutdown() -> None:
    """Destroy the process groups so ``init`` may be called again (tests, notebooks)."""
    global _GRID, _DEVICE
    if dist.is_initialized():
        dist.destroy_process_group()
    _GRID, _DEVICE = None, None
