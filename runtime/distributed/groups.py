"""Facts about a process group that every collective needs: size, rank, device, a name.

Kept apart from :mod:`.collectives` because the device rule is the part that differs between
the CPU tests and a GPU job: under NCCL every tensor a collective touches must live on the
rank's current CUDA device, under gloo on the host. Deciding it here, from the group's backend,
lets the rule be unit-tested on a CPU machine by faking the backend name.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Group", "is_active", "size", "rank", "device", "describe", "default_timeout_s", "wants_device",
           "new_host_group"]

#: A process group handle as torch returns it, or ``None`` for the default (world) group.
Group = Any

#: Backends whose collectives run on an accelerator, and the device type their tensors need.
_DEVICE_BACKENDS: dict[str, str] = {"nccl": "cuda"}


def default_timeout_s() -> float:
    """The one timeout setting: ``MERAK_TIMEOUT_S`` (300 s unless set), read at call time."""
    return float(os.environ.get("MERAK_TIMEOUT_S", 300))


def size(group: Group = None) -> int:
    """Ranks in ``group``; 1 without an initialised process group."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank(group: Group = None) -> int:
    """This process's rank inside ``group``; 0 without a process group."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def is_active(group: Group = None) -> bool:
    """Whether a collective over ``group`` has anyone to talk to (more than one rank)."""
    return dist.is_initialized() and dist.get_world_size(group) > 1


def device(group: Group = None) -> torch.device:
    """The device a tensor must live on for a collective over ``group``.

    NCCL (alone or in a mixed ``cpu:gloo,cuda:nccl`` group) -> the current CUDA device;
    anything else (gloo, no process group) -> the CPU. Never the CPU for an NCCL group: NCCL
    rejects host tensors in the first step of a GPU job, which no gloo test would notice.
    """
    backend = str(dist.get_backend(group)).lower() if dist.is_initialized() else ""
    for name, device_type in _DEVICE_BACKENDS.items():
        if name in backend:
            return torch.device(device_type, torch.cuda.current_device())
    return torch.device("cpu")


def wants_device(tensor: torch.Tensor, group: Group = None) -> torch.device | None:
    """The device ``tensor`` must move to before a collective over ``group``, or ``None``
    when it is already there (so a caller's CPU tensor still works under NCCL)."""
    target = device(group)
    here = tensor.device
    if here.type == target.type and (target.index is None or here.index == target.index):
        return None
    return target


def new_host_group(timeout: datetime.timedelta | None = None) -> Group:
    """A gloo group over the world when the default group's tensors live on an accelerator,
    else ``None`` (the default group already is host-side). Collective: every rank calls it.

    Why: small control messages (the p2p headers that size each payload) read from a device
    tensor cost a device->host synchronisation each; read from a gloo tensor they are a host
    read, and the device stream never stops the host.
    """
    if not is_active() or device().type == "cpu":
        return None
    return dist.new_group(backend="gloo", timeout=timeout)


def describe(group: Group = None) -> str:
    """``"the world (4 ranks)"`` or ``"the group of ranks [0, 2]"``, for error messages."""
    if not dist.is_initialized():
        return "no process group"
    if group is None or group is dist.group.WORLD:
        return f"the world ({dist.get_world_size()} ranks)"
    try:
        return f"the group of ranks {dist.get_process_group_ranks(group)}"
    except (RuntimeError, ValueError, KeyError):  # a group this rank is not part of
        return "a group this rank is not in"
