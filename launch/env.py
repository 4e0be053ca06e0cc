"""Read the process placement that an existing launcher put in the environment.

Merak never starts processes itself: torchrun and the deepspeed launcher export ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; under SLURM (``srun``) we
derive the same facts from ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the first
host of ``SLURM_JOB_NODELIST``. No launcher at all means a single process.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun/deepspeed", "slurm" or "none"


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[003-005,009],cpu1`` → ``gpu003``.

    Covers the compressed forms SLURM prints; avoids shelling out to ``scontrol`` so it works
    inside containers that lack the SLURM client.
    """
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}; set MASTER_ADDR explicitly")
    prefix, bracket = m.group(1), m.group(3)
    if not bracket:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Where this process sits, from whichever launcher started it."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            launcher="torchrun/deepspeed",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", DEFAULT_PORT, "none")
