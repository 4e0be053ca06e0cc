"""A hardware model of a training cluster: how long a kernel, a message and a collective take.

Why a model and not a lookup table of measured layouts: before renting 64 GPUs a user wants to
compare layouts (dp x tp x pp), schedules and recomputation modes that have never been run.
Everything the cluster simulator (:mod:`merak.runtime.cluster_sim`) needs from the hardware is
here, in three small objects:

* :class:`Device` - one accelerator: peak FLOP/s at the training precision with an
  **efficiency curve by GEMM size** (a matmul whose smallest dimension is ``d`` reaches
  ``matmul_efficiency * d / (d + half_efficiency_dim)`` of peak: large GEMMs saturate, the thin
  ones tensor parallelism creates do not), memory capacity and bandwidth (elementwise ops are
  bandwidth-bound), the shortest kernel and the host overhead per op;
* :class:`Link` - bandwidth and per-message latency of one kind of connection;
* :class:`Cluster` - ``nodes`` x ``gpus_per_node`` devices, an intra-node link (NVLink) and an
  inter-node link (each GPU's share of the node's NICs), with the placement arithmetic:
  ring all-reduce time ``2(n-1)/n * bytes / bw + 2(n-1) * latency`` where ``bw`` is the
  group's bottleneck bus bandwidth, and point-to-point time ``latency + bytes / bw``.

Presets describe A100 (40/80 GB) and H100 nodes as sold (8 GPUs, NVSwitch, one 200/400 Gb/s
NIC per GPU), with *achievable* rather than datasheet numbers where the two differ (NCCL bus
bandwidth, sustained GEMM efficiency). :func:`calibrate_device` fits a :class:`Device` to
measurements on the current machine (CPU, one thread, or a GPU when one is present), which is
how the model's error is checked (``benchmarks/cluster_sim.py``).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "Device", "Link", "Cluster", "DEVICE_PRESETS", "cluster_preset", "calibrate_device",
    "parse_bytes", "ring_allreduce_seconds",
]

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator at the training precision (see the module docstring for the curve).

    ``reserved_bytes`` is memory the framework cannot use for the model (CUDA context, NCCL
    buffers, allocator fragmentation); ``op_overhead_s`` is host time per op that is *not*
    hidden behind device work (0 on a GPU, whose launches are asynchronous; the dispatch cost
    on a CPU, where the host is the device).
    """

    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bytes_per_s: float
    matmul_efficiency: float = 0.8
    half_efficiency_dim: float = 96.0
    memory_efficiency: float = 0.8
    kernel_floor_s: float = 4e-6
    op_overhead_s: float = 0.0
    reserved_bytes: float = 2 * GiB

    def __post_init__(self) -> None:
        for name in ("peak_flops", "hbm_bytes", "hbm_bytes_per_s", "matmul_efficiency", "memory_efficiency"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Device {self.name!r}: {name} must be > 0, got {getattr(self, name)}")
        if self.matmul_efficiency > 1 or self.memory_efficiency > 1:
            raise ValueError(f"Device {self.name!r}: efficiencies are fractions of peak (<= 1)")

    @property
    def usable_bytes(self) -> float:
        """Memory left for parameters, gradients, optimizer states and activations."""
        return self.hbm_bytes - self.reserved_bytes

    def gemm_efficiency(self, m: float, n: float, k: float) -> float:
        """Fraction of peak a GEMM of ``m x k`` by ``k x n`` reaches (saturating in its smallest dim)."""
        d = max(min(m, n, k), 1.0)
        return self.matmul_efficiency * d / (d + self.half_efficiency_dim)

    def matmul_seconds(self, flops: float, m: float, n: float, k: float, nbytes: float = 0.0) -> float:
        """A matmul-like kernel: the slower of its compute (at the GEMM's efficiency) and its
        memory traffic, never shorter than the kernel floor; plus the host overhead."""
        if flops <= 0:
            return self.memory_seconds(nbytes)
        compute = flops / (self.peak_flops * self.gemm_efficiency(m, n, k))
        return self.op_overhead_s + max(self.kernel_floor_s, compute, self._traffic(nbytes))

    def memory_seconds(self, nbytes: float) -> float:
        """A bandwidth-bound kernel (elementwise, norm, softmax) moving ``nbytes``; views and
        shape queries (0 bytes) launch no kernel and cost only the host overhead."""
        if nbytes <= 0:
            return self.op_overhead_s
        return self.op_overhead_s + max(self.kernel_floor_s, self._traffic(nbytes))

    def _traffic(self, nbytes: float) -> float:
        return nbytes / (self.hbm_bytes_per_s * self.memory_efficiency)


@dataclasses.dataclass(frozen=True)
class Link:
    """A connection: ``bytes_per_s`` sustained per GPU, ``latency_s`` per message or ring step."""

    bytes_per_s: float
    latency_s: float

    def __post_init__(self) -> None:
        if self.bytes_per_s <= 0 or self.latency_s < 0:
            raise ValueError(f"a link needs bytes_per_s > 0 and latency_s >= 0, got {self}")

    def transfer_seconds(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.latency_s + nbytes / self.bytes_per_s


def ring_allreduce_seconds(nbytes: float, ranks: int, bytes_per_s: float, latency_s: float) -> float:
    """Ring all-reduce of ``nbytes`` over ``ranks`` devices: ``2(n-1)`` steps, each moving
    ``nbytes/n`` over a link of ``bytes_per_s`` and paying ``latency_s``."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    n = ranks
    return 2 * (n - 1) / n * nbytes / bytes_per_s + 2 * (n - 1) * latency_s


@dataclasses.dataclass(frozen=True)
class Cluster:
    """``nodes`` x ``gpus_per_node`` devices; global rank ``r`` sits on node ``r // gpus_per_node``
    (launchers fill a node before the next, and Merak's rank order keeps tp innermost)."""

    device: Device
    nodes: int
    gpus_per_node: int
    intra: Link
    inter: Link

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"a cluster needs nodes >= 1 and gpus_per_node >= 1, got {self.nodes}, {self.gpus_per_node}")

    @property
    def num_devices(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        if not 0 <= rank < self.num_devices:
            raise IndexError(f"rank {rank} is outside this cluster of {self.num_devices} devices")
        return rank // self.gpus_per_node

    def link_between(self, a: int, b: int) -> Link:
        return self.intra if self.node_of(a) == self.node_of(b) else self.inter

    def p2p_seconds(self, nbytes: float, src: int, dst: int) -> float:
        return self.link_between(src, dst).transfer_seconds(nbytes)

    def group_bandwidth(self, ranks: Sequence[int]) -> tuple[float, float]:
        """(bus bytes/s, latency) of a collective over ``ranks``.

        Inside one node: the intra link. Across nodes, the ring's node-crossing edges are the
        bottleneck; a group with ``r`` ranks on every node drives ``r`` NICs there (the other
        groups running at the same time use the rest), so it gets ``r`` x the per-GPU inter
        bandwidth, capped by the intra link. Uneven groups are limited by their thinnest node.
        """
        per_node = Counter(self.node_of(r) for r in ranks)
        if len(per_node) == 1:
            return self.intra.bytes_per_s, self.intra.latency_s
        r = min(per_node.values())
        return min(self.intra.bytes_per_s, r * self.inter.bytes_per_s), self.inter.latency_s

    def allreduce_seconds(self, nbytes: float, ranks: Sequence[int]) -> float:
        """Ring all-reduce of ``nbytes`` (each rank's buffer) over the devices ``ranks``."""
        if len(ranks) <= 1 or nbytes <= 0:
            return 0.0
        bw, latency = self.group_bandwidth(ranks)
        return ring_allreduce_seconds(nbytes, len(ranks), bw, latency)

    def allgather_seconds(self, nbytes: float, ranks: Sequence[int]) -> float:
        """Ring all-gather of a ``nbytes`` result (half of an all-reduce's traffic and steps)."""
        if len(ranks) <= 1 or nbytes <= 0:
            return 0.0
        bw, latency = self.group_bandwidth(ranks)
        n = len(ranks)
        return (n - 1) / n * nbytes / bw + (n - 1) * latency

    def describe(self) -> str:
        d = self.device
        return (f"{self.nodes} node(s) x {self.gpus_per_node} {d.name} ({d.peak_flops / 1e12:.0f} TFLOP/s peak, "
                f"GEMM efficiency <= {d.matmul_efficiency:.2f} (half at dim {d.half_efficiency_dim:g}), "
                f"{d.hbm_bytes / GiB:.0f} GiB at {d.hbm_bytes_per_s / 1e12:.2f} TB/s); intra-node "
                f"{self.intra.bytes_per_s / 1e9:g} GB/s + {self.intra.latency_s * 1e6:g} us, inter-node "
                f"{self.inter.bytes_per_s / 1e9:g} GB/s per GPU + {self.inter.latency_s * 1e6:g} us")


# ---- presets ------------------------------------------------------------------------------------

#: Devices at bf16. Peak FLOP/s and HBM are datasheet values; the efficiencies are what
#: large-GEMM benchmarks and STREAM-like kernels sustain (~80 % of peak for both).
DEVICE_PRESETS: dict[str, Device] = {
    "a100-40gb": Device("A100-SXM4-40GB", 312e12, 40 * GiB, 1.555e12),
    "a100-80gb": Device("A100-SXM4-80GB", 312e12, 80 * GiB, 2.039e12),
    "h100-80gb": Device("H100-SXM5-80GB", 989e12, 80 * GiB, 3.35e12, matmul_efficiency=0.75,
                        half_efficiency_dim=128.0),
}

#: (intra-node NVLink bus bandwidth, inter-node bandwidth per GPU) in bytes/s. NVLink values are
#: NCCL's achievable bus bandwidth on NVSwitch (A100: 300 GB/s per direction nominal, ~230 GB/s
#: reached; H100: 450 nominal, ~360 reached); inter-node is one HDR 200 Gb/s (A100) or NDR
#: 400 Gb/s (H100) NIC per GPU at ~90 % of line rate.
_LINKS: dict[str, tuple[Link, Link]] = {
    "a100-40gb": (Link(230e9, 3e-6), Link(22.5e9, 6e-6)),
    "a100-80gb": (Link(230e9, 3e-6), Link(22.5e9, 6e-6)),
    "h100-80gb": (Link(360e9, 3e-6), Link(45e9, 6e-6)),
}


def cluster_preset(name: str, nodes: int = 1, gpus_per_node: int = 8, device: Device | None = None) -> Cluster:
    """A cluster of ``nodes`` DGX-like nodes of preset ``name`` (``a100-40gb``, ``a100-80gb``,
    ``h100-80gb``); ``device`` replaces the preset's device (e.g. one from :func:`calibrate_device`)."""
    key = name.lower()
    if key not in DEVICE_PRESETS:
        raise ValueError(f"unknown device preset {name!r}; choose one of {sorted(DEVICE_PRESETS)}")
    intra, inter = _LINKS[key]
    return Cluster(device or DEVICE_PRESETS[key], nodes, gpus_per_node, intra, inter)


def parse_bytes(text: str | float | int) -> float:
    """``"80GB"``, ``"40GiB"``, ``"512MB"`` or a number of bytes → bytes. GB and GiB both mean
    2**30 here: device memory is sold as "80 GB" and holds 80 GiB."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().upper().replace(" ", "")
    for suffix, scale in (("GIB", GiB), ("GB", GiB), ("G", GiB), ("MIB", 2**20), ("MB", 2**20), ("M", 2**20),
                          ("TIB", 2**40), ("TB", 2**40), ("B", 1)):
        if s.endswith(suffix):
            try:
                return float(s[: -len(suffix)]) * scale
            except ValueError:
                break
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GB, 40GiB or 512MB") from None


# ---- calibration ----------------------------------------------------------------------------------

def _median_seconds(fn: Callable[[], object], sync: Callable[[], None], repeats: int, inner: int) -> float:
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def _memory_total_bytes() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 16.0 * GiB


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate_device` measured (kept so reports can show the fit beside the data)."""

    device: Device
    gemm: tuple[tuple[int, float], ...]  # (size, seconds) of square GEMMs
    copy_bytes_per_s: float
    op_seconds: float


def calibrate_device(name: str = "this-cpu", device: str = "cpu", dtype: str = "float32",
                     sizes: Sequence[int] = (32, 64, 128, 256, 512, 1024), repeats: int = 5) -> Calibration:
    """Fit a :class:`Device` to this machine by timing square GEMMs of ``sizes``, a large
    elementwise add and a tiny op, on ``device`` (``"cpu"`` - use one thread, as the
    benchmarks do - or ``"cuda"``) at ``dtype``.

    The GEMM fit is least squares of ``1/throughput = a + b/d``, i.e. the curve
    ``peak * d / (d + half)`` with ``peak = 1/a`` and ``half = b/a`` (so ``matmul_efficiency``
    is 1 against the fitted peak). The add gives the memory bandwidth; the tiny op the
    per-op host overhead (CPU) or the kernel floor (GPU, where launches are asynchronous).
    """
    import torch

    dev = torch.device(device)
    dt = getattr(torch, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gemm: list[tuple[int, float]] = []
    with torch.no_grad():
        for d in sizes:
            a = torch.randn(d, d, device=dev, dtype=dt)
            b = torch.randn(d, d, device=dev, dtype=dt)
            inner = max(1, int(2e8 / (2 * d**3)))
            gemm.append((d, _median_seconds(lambda: torch.mm(a, b), sync, repeats, inner)))
        n = 1 << 22 if dev.type == "cpu" else 1 << 26
        x = torch.randn(n, device=dev, dtype=dt)
        y = torch.randn(n, device=dev, dtype=dt)
        z = torch.empty_like(x)
        add_s = _median_seconds(lambda: torch.add(x, y, out=z), sync, repeats, 4)
        tiny = torch.ones(1, device=dev, dtype=dt)
        op_s = _median_seconds(lambda: tiny.add_(1.0), sync, repeats, 200)
    host = op_s if dev.type == "cpu" else 0.0  # a CPU pays the dispatch on top of the GEMM
    # (1/d, seconds per FLOP); GEMMs within 3x of the dispatch time say nothing about the rate
    points = [(1.0 / d, (t - host) / (2.0 * d**3)) for d, t in gemm if t > 3 * host] or \
        [(1.0 / d, t / (2.0 * d**3)) for d, t in gemm]
    intercept, slope = _relative_fit(points)
    bandwidth = 3 * n * x.element_size() / add_s
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        capacity, floor, overhead, reserved = float(props.total_memory), op_s, 0.0, 2 * GiB
    else:
        capacity, floor, overhead, reserved = _memory_total_bytes(), 0.0, op_s, 0.0
    fitted = Device(name, peak_flops=1.0 / intercept, hbm_bytes=capacity, hbm_bytes_per_s=bandwidth,
                    matmul_efficiency=1.0, half_efficiency_dim=slope / intercept, memory_efficiency=1.0,
                    kernel_floor_s=floor, op_overhead_s=overhead, reserved_bytes=reserved)
    return Calibration(fitted, tuple(gemm), bandwidth, op_s)


def _relative_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares of ``y = a + b x`` weighted by ``1/y**2`` (relative errors: the small GEMMs'
    tiny times must not be drowned by the big ones'). Without saturation (``a <= 0``) the
    fastest rate is the peak and the curve is flat."""
    w = [1.0 / (y * y) for _, y in points]
    sw = sum(w)
    mx = sum(wi * x for wi, (x, _) in zip(w, points)) / sw
    my = sum(wi * y for wi, (_, y) in zip(w, points)) / sw
    var = sum(wi * (x - mx) ** 2 for wi, (x, _) in zip(w, points))
    slope = sum(wi * (x - mx) * (y - my) for wi, (x, y) in zip(w, points)) / var if var > 0 else 0.0
    intercept = my - slope * mx
    if intercept <= 0 or slope < 0:
        return min(y for _, y in points), 0.0
    return intercept, slope
