"""A hardware model of a training cluster: how long a kernel, a message and a collective take.

Why a model and not a lookup table of measured layouts: before renting 64 GPUs a user wants to
compare layouts (dp x tp x pp), schedules and recomputation modes that have never been run.
Everything the cluster simulator (:mod:`merak.planner.simulator`) needs from the hardware is
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
from typing import Any

__all__ = [
    "Device", "Link", "Cluster", "DEVICE_PRESETS", "OP_CLASSES", "cluster_preset", "calibrate_device",
    "op_class", "parse_bytes", "ring_allreduce_seconds",
]

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator at the training precision (see the module docstring for the curve).

    ``reserved_bytes`` is memory the framework cannot use for the model (CUDA context, NCCL
    buffers, allocator fragmentation); ``op_overhead_s`` is host time per op that is *not*
    hidden behind device work (0 on a GPU, whose launches are asynchronous; the dispatch cost
    on a CPU, where the host is the device). Backward over forward: a matmul's backward runs two
    GEMMs of its size (input and weight gradients, 2x); a bandwidth-bound op's reads the output
    gradient and a saved tensor and writes the input gradient (three tensors where the forward
    moved two, 1.5x); :func:`calibrate_device` measures both. ``op_rates``: per op class
    (:data:`OP_CLASSES`), forward and backward bytes/s measured on the device (bytes = the
    forward's inputs and outputs); empty for the presets, whose elementwise kernels are
    bandwidth-bound.
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
    matmul_backward_factor: float = 2.0
    memory_backward_factor: float = 1.5
    op_rates: tuple[tuple[str, float, float], ...] = ()

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
        """Fraction of peak a GEMM of ``m x k`` by ``k x n`` reaches. It saturates with the GEMM's
        arithmetic intensity, written as the side ``d = 3mnk / (mk + kn + mn)`` of the square GEMM
        of equal intensity (FLOPs per element moved): ``matmul_efficiency * d / (d + half)``. A
        thin GEMM (tensor parallelism's ``n/tp`` or ``k/tp``) has a small ``d``."""
        d = _square_side(max(m, 1.0), max(n, 1.0), max(k, 1.0))
        return self.matmul_efficiency * d / (d + self.half_efficiency_dim)

    def matmul_seconds(self, flops: float, m: float, n: float, k: float, nbytes: float = 0.0) -> float:
        """A matmul-like kernel: the slower of its compute (at the GEMM's efficiency) and its
        memory traffic, never shorter than the kernel floor; plus the host overhead."""
        if flops <= 0:
            return self.memory_seconds(nbytes)
        compute = flops / (self.peak_flops * self.gemm_efficiency(m, n, k))
        return self.op_overhead_s + max(self.kernel_floor_s, compute, self._traffic(nbytes))

    def memory_seconds(self, nbytes: float, kind: str | None = None, backward: bool = False) -> float:
        """A bandwidth-bound kernel (elementwise, norm, softmax) moving ``nbytes`` (its forward's
        inputs and outputs), forward or backward; views and shape queries (0 bytes) launch no
        kernel and cost only the host overhead. ``kind`` (see :data:`OP_CLASSES`) picks a
        calibrated rate where the device has one (:attr:`op_rates`, e.g. a CPU, where a tanh or
        a dropout's random numbers are compute-bound); otherwise the op moves its bytes at the
        memory bandwidth, and its backward takes ``memory_backward_factor`` x as long."""
        if nbytes <= 0:
            return self.op_overhead_s
        rates = dict((c, (f, b)) for c, f, b in self.op_rates)
        if rates:
            fwd, bwd = rates.get(kind or "", rates.get("arith", (self.hbm_bytes_per_s, self.hbm_bytes_per_s)))
            t = nbytes / (bwd if backward else fwd)
        else:
            t = self._traffic(nbytes) * (self.memory_backward_factor if backward else 1.0)
        return self.op_overhead_s + max(self.kernel_floor_s, t)

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

def _best_seconds(fn: Callable[[], object], sync: Callable[[], None], repeats: int, inner: int) -> float:
    """Fastest of ``repeats`` timings (each the mean of ``inner`` calls): on a shared machine the
    minimum is the run least disturbed by other jobs, i.e. the device's own speed."""
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / inner)
    return min(samples)


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
    rows: int  # rows of the timed linear layers
    gemm: tuple[tuple[int, float], ...]  # (d, seconds) of a d -> d linear layer over ``rows`` rows
    elementwise_bytes_per_s: tuple[tuple[str, float], ...]  # forward rate per op class
    op_seconds: float


#: Classes of bandwidth-bound ops with their own calibrated rate, and the op names (fx targets,
#: or module class names in lower case) in each; anything else counts as ``arith``.
OP_CLASSES: dict[str, frozenset[str]] = {
    "transcendental": frozenset({"tanh", "exp", "pow", "sqrt", "rsqrt", "log", "erf", "sigmoid", "gelu", "silu",
                                 "newgeluactivation", "geluactivation", "gelutanh", "siluactivation",
                                 "pytorchgelutanh", "sin", "cos"}),
    "softmax": frozenset({"softmax", "log_softmax", "cross_entropy", "nll_loss"}),
    "norm": frozenset({"layer_norm", "layernorm", "rms_norm", "llamarmsnorm", "t5layernorm", "group_norm"}),
    "dropout": frozenset({"dropout", "feature_alpha_dropout", "alpha_dropout"}),
}


def op_class(name: str) -> str:
    """The :data:`OP_CLASSES` class of an op name (``arith`` for the rest)."""
    key = name.lower()
    for cls, names in OP_CLASSES.items():
        if key in names:
            return cls
    return "arith"


def _class_ops(torch: Any, x: Any) -> dict[str, list[Callable[[Any], Any]]]:
    """Representative ops of each class, applied to an activation-sized ``x``."""
    f = torch.nn.functional
    w = torch.ones(x.shape[-1], device=x.device, dtype=x.dtype)
    return {
        "arith": [lambda t: t + t, lambda t: t * 0.5],
        "transcendental": [torch.tanh, lambda t: torch.pow(t, 3.0), lambda t: f.gelu(t, approximate="tanh")],
        "softmax": [lambda t: t.softmax(-1)],
        "norm": [lambda t: f.layer_norm(t, t.shape[-1:], w, w)],
        "dropout": [lambda t: f.dropout(t, 0.1)],
    }


def calibrate_device(name: str = "this-cpu", device: str = "cpu", dtype: str = "float32",
                     sizes: Sequence[int] = (32, 64, 128, 256, 512, 1024), repeats: int = 5) -> Calibration:
    """Fit a :class:`Device` to this machine on ``device`` (``"cpu"`` - use one thread, as the
    benchmarks do - or ``"cuda"``) at ``dtype``:

    * linear layers ``d -> d`` over 512 rows (a CPU micro-batch's tokens; 8192 on a GPU) for
      ``d`` in ``sizes``: least squares of ``1/throughput = a + b/d_eff`` (``d_eff`` the
      intensity side of :meth:`Device.gemm_efficiency`), i.e. the curve ``peak * d / (d + half)``
      with ``peak = 1/a`` and ``half = b/a`` (``matmul_efficiency`` is 1 against the fitted peak),
      and their backward (input and weight gradients) over their forward: the matmul backward
      factor (median over sizes);
    * per op class (:data:`OP_CLASSES`: arithmetic, transcendental, softmax, norm, dropout),
      representative ops on an activation-sized tensor, forward and backward: the rate they
      reach in bytes (in and out) per second - on a CPU a tanh or a dropout is compute-bound and
      runs 10-50x slower than an add, which one bandwidth could not say;
    * a 1-element op: the per-op host overhead (CPU) or the kernel floor (GPU, where launches
      are asynchronous).
    """
    import torch

    dev = torch.device(device)
    dt = getattr(torch, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = 512 if dev.type == "cpu" else 8192
    with torch.no_grad():
        tiny = torch.ones(1, device=dev, dtype=dt)
        op_s = _best_seconds(lambda: tiny.add_(1.0), sync, repeats, 200)
    gemm: list[tuple[int, float]] = []
    backward_ratios = []
    for d in sizes:
        layer = torch.nn.Linear(d, d, device=dev, dtype=dt)
        x = torch.randn(rows, d, device=dev, dtype=dt, requires_grad=True)
        inner = max(1, int(2e8 / (2 * rows * d * d)))
        with torch.no_grad():
            gemm.append((d, _best_seconds(lambda: layer(x), sync, repeats, inner)))
        back = _backward_seconds(torch, layer(x), [x, *layer.parameters()], torch.ones(rows, d, device=dev, dtype=dt),
                                 sync, repeats)
        backward_ratios.append(back / gemm[-1][1])
    width = 512 if dev.type == "cpu" else 4096
    x = torch.randn(rows, width, device=dev, dtype=dt, requires_grad=True)
    grad = torch.ones_like(x)
    moved = 2 * x.numel() * x.element_size()  # one tensor in, one out
    host = op_s if dev.type == "cpu" else 0.0
    rates = []
    for cls, ops in _class_ops(torch, x).items():
        with torch.no_grad():
            fwd = statistics.fmean(_best_seconds(lambda op=op: op(x), sync, repeats, 5) for op in ops)
        bwd = statistics.fmean(_backward_seconds(torch, op(x), [x], grad, sync, repeats) for op in ops)
        rates.append((cls, moved / max(fwd - host, 1e-9), moved / max(bwd - host, 1e-9)))
    arith_fwd, arith_bwd = rates[0][1], rates[0][2]
    # (1/d_eff, seconds per FLOP); GEMMs within 3x of the dispatch time say nothing about the rate
    d_eff = {d: _square_side(rows, d, d) for d, _ in gemm}
    points = [(1.0 / d_eff[d], (t - host) / (2.0 * rows * d * d)) for d, t in gemm if t > 3 * host] or \
        [(1.0 / d_eff[d], t / (2.0 * rows * d * d)) for d, t in gemm]
    intercept, slope = _relative_fit(points)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        capacity, floor, overhead, reserved = float(props.total_memory), op_s, 0.0, 2 * GiB
    else:
        capacity, floor, overhead, reserved = _memory_total_bytes(), 0.0, op_s, 0.0
    fitted = Device(name, peak_flops=1.0 / intercept, hbm_bytes=capacity, hbm_bytes_per_s=arith_fwd,
                    matmul_efficiency=1.0, half_efficiency_dim=slope / intercept, memory_efficiency=1.0,
                    kernel_floor_s=floor, op_overhead_s=overhead, reserved_bytes=reserved,
                    matmul_backward_factor=max(statistics.median(backward_ratios), 1.0),
                    memory_backward_factor=arith_fwd / arith_bwd, op_rates=tuple(rates))
    return Calibration(fitted, rows, tuple(gemm), tuple((c, f) for c, f, _ in rates), op_s)


def _backward_seconds(torch: Any, y: Any, inputs: list[Any], grad: Any, sync: Callable[[], None],
                      repeats: int) -> float:
    """The backward of one op alone (its graph kept and re-run), not forward + backward."""
    return _best_seconds(lambda: torch.autograd.grad(y, inputs, grad, retain_graph=True), sync, repeats, 5)


def _square_side(m: float, n: float, k: float) -> float:
    """Side of the square GEMM with the arithmetic intensity of an ``m x k`` by ``k x n`` one."""
    return 3.0 * m * n * k / (m * k + k * n + m * n)


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
