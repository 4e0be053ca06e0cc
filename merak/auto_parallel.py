"""``MerakArguments(auto_parallel=True)``: choose dp, tp, pp and the rest with the simulator.

Why at start-up: the best layout depends on the model, the global batch and the machine, and a
user who did not run ``python -m merak.planner`` first should still get a sensible one. The trainer
traces the model (on meta, as always), this module describes the machine it runs on as a
:class:`~merak.planner.cluster.Cluster` (GPU presets by name, or a calibration of this device),
searches (dp, tp, pp, micro-batch, schedule, recompute, tp_sub_microbatches) with
:func:`merak.planner.search.search`, and the trainer then calls ``merak.init`` with the
winner and trains it.

Rank 0 decides and broadcasts: calibrations differ slightly between ranks, and every rank must
build the same grid. The global batch the user asked for is kept - HF's meaning,
``per_device_train_batch_size x gradient_accumulation_steps x world size`` sequences per step -
and re-split into the chosen micro-batch and number of micro-batches.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from merak.runtime.distributed import groups
from merak.runtime.distributed.objects import broadcast_object
from merak.planner.cluster import DEVICE_PRESETS, Cluster, Link, calibrate_device, cluster_preset, parse_bytes

logger = logging.getLogger("merak")

__all__ = ["LayoutChoice", "local_cluster", "choose_layout", "decide_on_rank0"]

#: A gloo loopback link on one machine, as measured by benchmarks/planner_validation.py on the
#: development machine (order of magnitude; only matters for ranking layouts on CPU).
CPU_LINK = Link(1.0e9, 1.0e-4)
#: A Linux CFS time slice (order of magnitude): what a message to a rank that is waiting for a
#: core costs on top of the link's own latency.
OS_TIME_SLICE_S = 1.0e-3


@dataclasses.dataclass(frozen=True)
class LayoutChoice:
    """What auto-parallel picked and what it predicts."""

    dp: int
    tp: int
    pp: int
    micro_batch: int
    num_microbatches: int
    schedule: str
    recompute: str
    tp_sub_microbatches: int
    step_seconds: float
    peak_memory_bytes: float
    mfu: float
    table: str = ""


def local_cluster(world_size: int, local_world_size: int, memory_bytes: float | None = None,
                  cpu_link: Link = CPU_LINK) -> Cluster:
    """The machines this job runs on, as the simulator sees them.

    CUDA: a preset when the device name says A100 or H100 (with its memory), otherwise this GPU
    calibrated. CPU: this CPU calibrated (one thread per rank); when more ranks than cores share a
    node, each gets its share of a core. ``memory_bytes`` (``max_memory_per_device``) caps the
    device memory the search may plan for; ``cpu_link`` is the rank-to-rank link on CPU (gloo).
    """
    nodes = max(1, world_size // max(1, local_world_size))
    per_node = world_size // nodes
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        total = float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
        preset = None
        if "a100" in name:
            preset = "a100-80gb" if total > 50 * 2**30 else "a100-40gb"
        elif "h100" in name:
            preset = "h100-80gb"
        cluster = (cluster_preset(preset, nodes, per_node) if preset in DEVICE_PRESETS
                   else cluster_preset("a100-80gb", nodes, per_node, device=calibrate_device(name, "cuda").device))
    else:
        device = calibrate_device("this-cpu").device
        cores = os.cpu_count() or 1
        share = min(1.0, cores / per_node)
        device = dataclasses.replace(device, peak_flops=device.peak_flops * share,
                                     hbm_bytes_per_s=device.hbm_bytes_per_s * share,
                                     op_overhead_s=device.op_overhead_s / share)
        # With more ranks than cores, a message waits until the OS schedules its receiver: each
        # hop pays about a scheduler time slice per extra rank sharing a core.
        wait = max(0.0, per_node / cores - 1.0) * OS_TIME_SLICE_S
        link = dataclasses.replace(cpu_link, latency_s=cpu_link.latency_s + wait)
        cluster = Cluster(device, nodes, per_node, link, link)
    if memory_bytes is not None:
        cluster = dataclasses.replace(cluster, device=dataclasses.replace(
            cluster.device, hbm_bytes=memory_bytes + cluster.device.reserved_bytes))
    return cluster


def _micro_batch_choices(global_batch: int) -> tuple[int, ...]:
    return tuple(b for b in (1, 2, 4, 8, 16, 32) if b <= global_batch and global_batch % b == 0)


def choose_layout(graph: Any, seq_len: int, trace_batch: int, global_batch: int, cluster: Cluster,
                  keep: int = 5, virtual_stages: bool = True) -> LayoutChoice:
    """Search the layouts of ``cluster`` for ``graph`` (traced at ``trace_batch`` sequences of
    ``seq_len``) training ``global_batch`` sequences per step; the fastest one that fits.
    ``virtual_stages`` adds ``zb_v`` and ``interleaved_1f1b`` (with every recompute mode and tp)."""
    from merak.planner.search import SearchSpace, search
    from merak.planner.simulator import TracedModel

    model = TracedModel(type(graph.model).__name__, graph, seq_len, trace_batch=trace_batch)
    schedules = SearchSpace.schedules + (("zb_v", "interleaved_1f1b") if virtual_stages else ())
    space = SearchSpace(micro_batches=_micro_batch_choices(global_batch), schedules=schedules)
    result = search(model, cluster, global_batch, space, keep=keep)
    if not result.best:
        raise ValueError(
            f"auto_parallel found no layout of {cluster.num_devices} devices that fits "
            f"{cluster.device.usable_bytes / 2**30:.1f} GiB per device for a global batch of {global_batch} "
            f"({result.candidates} candidates, {result.refused_memory} too large"
            + (f"; e.g. {result.invalid[0]}" if result.invalid else "")
            + "); use more devices, a smaller batch or sequence, or set max_memory_per_device higher")
    best = result.best[0]
    s = best.strategy
    return LayoutChoice(s.dp, s.tp, s.pp, s.micro_batch, best.microbatches, s.schedule, s.recompute,
                        s.tp_sub_microbatches, best.step_seconds, best.peak_memory_bytes, best.mfu,
                        table=_table(result.best))


def _table(predictions: Any) -> str:
    rows = ["rank  layout                                            step s   peak GiB  MFU"]
    for i, p in enumerate(predictions, 1):
        rows.append(f"{i:>4}  {p.strategy.label():48s}  {p.step_seconds:7.3f}  {p.peak_memory_bytes / 2**30:8.2f}  "
                    f"{p.mfu * 100:4.1f}%")
    return "\n".join(rows)


def decide_on_rank0(graph: Any, example: Mapping[str, Any], per_device_batch: int, accumulation: int,
                    max_memory: str | None, timeout_s: float) -> LayoutChoice:
    """Every rank calls this (the default process group exists); rank 0 searches, all get its
    choice. The user's global batch is ``per_device_batch x accumulation x world size``."""
    world, rank = groups.size(), groups.rank()
    seq_len = _sequence_length(example)
    global_batch = per_device_batch * accumulation * world
    choice: Any = None
    if rank == 0:
        try:
            cluster = local_cluster(world, _local_world_size(world),
                                    parse_bytes(max_memory) if max_memory else None)
            # the trainer plans a budget per rank with virtual stages too (its chunks summed)
            choice = choose_layout(graph, seq_len, per_device_batch, global_batch, cluster)
        except Exception as exc:  # every rank must raise, not only rank 0
            choice = exc
    choice = broadcast_object(choice, 0, "rank 0's parallel layout choice", timeout_s=timeout_s)
    if isinstance(choice, Exception):
        raise choice
    return choice


def _local_world_size(world: int) -> int:
    """Ranks per node as the launcher says (torchrun, the deepspeed launcher, SLURM), else all."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return world


def _sequence_length(example: Mapping[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "pixel_values"):
        value = example.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1])
    tensors = [v for v in example.values() if isinstance(v, torch.Tensor) and v.dim() >= 2]
    return int(tensors[0].shape[1]) if tensors else 1
