"""Measured node costs: time every node of the traced graph on the real device.

Why measure: the FLOP roofline (:class:`~merak.partitioner.cost_model.FlopCostModel`) ranks a
GPT-2 block's attention and MLP halves by their FLOPs, but on a real device softmax, layer norms,
the loss and the framework's per-op overhead cost more than their FLOPs say, and how much more
depends on the device. A stage plan that is FLOP-balanced can then be time-unbalanced by 5-10 %,
and the slowest stage sets the pipeline's pace. Profiling replaces the estimate by the time each
node actually takes, forward and backward, on the device that will train.

How: the graph is interpreted node by node on real tensors (one example micro-batch). Each node
is run once to warm up and ``repeats`` times timed (median), and - when its output requires
grad - ``repeats`` more times followed by a backward with all-ones output gradients, timed. The
node's inputs are detached leaves, so a backward measures that node alone (the backward of a
parameterised module includes accumulating its weight gradients, as in training). Values are freed
after their last use, so profiling holds about one micro-batch of activations. Weights on the
meta device are stood in for by random tensors, one node at a time, so a model built under
``init_empty_weights`` can be profiled as long as one layer fits.

Different ranks measure slightly different times; a pipeline needs one plan, so
:meth:`ProfiledCostModel.averaged` averages the measurements over a process group before
sharding.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .cost_model import CostModel, NodeCost
from .proxy_graph import COMPUTE, REPLICATED, ProxyGraph, ProxyNode
from .tracer import resolve_path

__all__ = ["DeviceTimer", "ProfiledCostModel", "example_on_device", "mean_over_ranks", "profile_costs"]

_PROFILED_ROLES = (COMPUTE, REPLICATED)


@dataclasses.dataclass(frozen=True)
class ProfiledCostModel(CostModel):
    """Node costs measured by :func:`profile_costs` (seconds per micro-batch on ``device``).

    ``link_bytes_per_second`` prices cuts as :class:`FlopCostModel` does (off by default).
    Nodes that were not measured (none, for a graph profiled whole) cost nothing.
    """

    times: Mapping[str, NodeCost]
    device: str = "cpu"
    repeats: int = 3
    link_bytes_per_second: float | None = None

    name = "profile"

    def node_cost(self, node: ProxyNode) -> NodeCost:
        return self.times.get(node.name, NodeCost(0.0, 0.0))

    def transfer_cost(self, nbytes: int) -> float:
        return nbytes / self.link_bytes_per_second if self.link_bytes_per_second else 0.0

    @property
    def total(self) -> NodeCost:
        return NodeCost(sum(c.forward for c in self.times.values()), sum(c.backward for c in self.times.values()))

    def describe(self) -> str:
        total = self.total
        return (f"ProfiledCostModel(measured on {self.device}, median of {self.repeats}, "
                f"forward {total.forward * 1e3:.1f} ms + backward {total.backward * 1e3:.1f} ms per micro-batch)")

    def averaged(self, group: Any = None, timeout_s: float = 300.0) -> "ProfiledCostModel":
        """The mean of every rank's measurements over ``group`` (all ranks must call this with
        the same graph), so all pipeline stages shard identically. A no-op without a process group."""
        names = sorted(self.times)
        values = torch.tensor([[self.times[n].forward, self.times[n].backward] for n in names],
                              dtype=torch.float64)
        values = mean_over_ranks(values, group, timeout_s,
                                 "the all-reduce of profiled node costs (every rank must profile)").tolist()
        times = {n: NodeCost(f, b) for n, (f, b) in zip(names, values)}
        return dataclasses.replace(self, times=times)


def profile_costs(
    graph: ProxyGraph,
    example_inputs: Mapping[str, Any],
    *,
    device: torch.device | str | None = None,
    repeats: int = 3,
    link_bytes_per_second: float | None = None,
) -> ProfiledCostModel:
    """Time every compute node of ``graph`` on ``device`` with the real ``example_inputs``
    (one micro-batch, the shape the pipeline will run) and return the cost model.

    ``device`` defaults to the device of the first example tensor. The model's parameter
    gradients are reset to ``None`` afterwards.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev, example_inputs = example_on_device(example_inputs, device, "profile_costs")
    timer = DeviceTimer(dev)
    timer.backward_overhead = _backward_launch_seconds(timer, dev, repeats)
    runner = _NodeRunner(graph, example_inputs, dev)
    times: dict[str, NodeCost] = {}
    try:
        for fx_node, record in zip(graph.graph.nodes, graph.nodes):
            if fx_node.op in ("placeholder", "get_attr", "output"):
                runner.store(fx_node, runner.value_of(fx_node))
                continue
            call = runner.call_for(fx_node)
            if record.role in _PROFILED_ROLES:
                times[record.name] = _measure(call, runner, fx_node, record, timer, repeats)
            runner.store(fx_node, _run_for_value(call, runner, fx_node, record))
    finally:
        for p in graph.model.parameters():
            p.grad = None
    return ProfiledCostModel(times=times, device=str(dev), repeats=repeats,
                             link_bytes_per_second=link_bytes_per_second)


def example_on_device(example_inputs: Mapping[str, Any], device: torch.device | str | None,
                      who: str) -> tuple[torch.device, dict[str, Any]]:
    """The device to time on (``device``, else that of the first example tensor, else CPU) and
    the example micro-batch moved there. Meta example tensors are refused: timing needs values."""
    tensors = [v for v in pytree.tree_leaves(dict(example_inputs)) if isinstance(v, torch.Tensor)]
    if any(t.device.type == "meta" for t in tensors):
        raise ValueError(f"{who} needs real example inputs (one collated micro-batch), not meta "
                         "tensors: the point is to time the device")
    dev = torch.device(device) if device is not None else (tensors[0].device if tensors else torch.device("cpu"))
    return dev, pytree.tree_map_only(torch.Tensor, lambda t: t.to(dev), dict(example_inputs))


def mean_over_ranks(values: torch.Tensor, group: Any, timeout_s: float, what: str) -> torch.Tensor:
    """The element-wise mean of ``values`` over ``group`` (a CPU tensor back; every rank must call).

    Timings differ slightly between ranks, but every rank must derive the same partition from
    them, so measurements are averaged before any decision is taken. A no-op without a process group.
    """
    from merak.runtime.distributed import collectives, groups

    if not groups.is_active(group):
        return values
    values = values.to(groups.device(group), copy=True)
    return collectives.all_reduce(values, what, op="mean", group=group, timeout_s=timeout_s).cpu()


def _measure(call: Callable[[Any], Any], runner: "_NodeRunner", fx_node: fx.Node, record: ProxyNode,
             timer: "DeviceTimer", repeats: int) -> NodeCost:
    """Median forward and backward seconds of one node, each run on fresh leaf inputs."""
    call(runner.arguments(fx_node, leaves=True))  # warm-up: lazy initialisation, allocator
    forward = []
    for _ in range(repeats):
        args = runner.arguments(fx_node, leaves=True)
        forward.append(timer.time(lambda: call(args))[0])
    backward = []
    if record.requires_grad and record.mutates is None:
        for _ in range(repeats):
            out = call(runner.arguments(fx_node, leaves=True))
            outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not outs:
                break
            grads = [torch.ones_like(t) for t in outs]
            seconds = timer.time(lambda: torch.autograd.backward(outs, grads))[0]
            backward.append(max(0.0, seconds - timer.backward_overhead))
    return NodeCost(statistics.median(forward), statistics.median(backward) if backward else 0.0)


def _run_for_value(call: Callable[[Any], Any], runner: "_NodeRunner", fx_node: fx.Node,
                   record: ProxyNode) -> Any:
    """The node's output for the nodes after it: detached, but still flagged ``requires_grad``
    where training would track it (that flag decides which later backwards are measured).
    In-place nodes run on the stored values themselves, as the graph does."""
    if record.mutates is not None:
        with torch.no_grad():
            return call(runner.arguments(fx_node, leaves=False))
    out = call(runner.arguments(fx_node, leaves=True))
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().requires_grad_(t.requires_grad), out)


def _backward_launch_seconds(timer: "DeviceTimer", device: torch.device, repeats: int) -> float:
    """What starting a backward costs by itself (engine set-up, not the node's work).

    A training step pays it once per micro-batch, but the isolated per-node backwards pay it once
    per node, which would make every small node (views, adds) look as expensive as a launch and
    shift cuts toward node-dense regions; it is measured on a one-element op and subtracted."""
    samples = []
    for _ in range(max(5, 3 * repeats)):
        leaf = torch.ones(1, device=device, requires_grad=True)
        out = leaf * 1.0
        grad = torch.ones_like(out)
        samples.append(timer.time(lambda: torch.autograd.backward([out], [grad]))[0])
    return statistics.median(samples)


class DeviceTimer:
    """Wall-clock seconds of a callable, synchronising the device around it."""

    backward_overhead: float = 0.0

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return time.perf_counter() - start, result


class _NodeRunner:
    """Executes single fx nodes of the traced graph on real values, freeing them after last use."""

    def __init__(self, graph: ProxyGraph, example_inputs: Mapping[str, Any], device: torch.device) -> None:
        self.graph, self.device = graph, device
        self.model = graph.model
        self.inputs = dict(example_inputs)  # already on ``device`` (see example_on_device)
        self.trace_devices = {torch.device(d) for d in graph.traced.trace_devices}
        self.env: dict[fx.Node, Any] = {}
        order = {n: i for i, n in enumerate(graph.graph.nodes)}
        self.last_use: dict[fx.Node, int] = {}
        for n in graph.graph.nodes:
            for user in n.users:
                self.last_use[n] = max(self.last_use.get(n, -1), order[user])
        self.order = order

    # -- values ---------------------------------------------------------------------------------
    def value_of(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            if node.target not in self.inputs:
                raise KeyError(f"the example batch lacks input {node.target!r} the traced graph reads")
            return self.inputs[node.target]
        if node.op == "get_attr":
            traced = self.graph.traced
            obj = traced.constants[node.target] if node.target in traced.constants else resolve_path(self.model, node.target)
            return _materialized(obj, self.device)
        return None

    def store(self, node: fx.Node, value: Any) -> None:
        self.env[node] = value
        position = self.order[node]
        for earlier in list(self.env):
            if self.last_use.get(earlier, -1) < position and earlier is not node:
                del self.env[earlier]

    def arguments(self, node: fx.Node, leaves: bool) -> tuple[tuple, dict]:
        """The node's ``(args, kwargs)``; with ``leaves`` non-parameter float tensors become fresh
        leaves (requiring grad where the traced value did), so a backward stops at this node."""
        def lookup(a: Any) -> Any:
            if isinstance(a, fx.Node):
                value = self.env[a]
                return pytree.tree_map_only(torch.Tensor, self._leaf, value) if leaves else value
            return self.device if isinstance(a, torch.device) and a in self.trace_devices else a

        return fx.node.map_aggregate(node.args, lookup), fx.node.map_aggregate(node.kwargs, lookup)

    @staticmethod
    def _leaf(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter) or not t.is_floating_point():
            return t
        return t.detach().clone().requires_grad_(t.requires_grad)

    # -- calls ----------------------------------------------------------------------------------
    def call_for(self, node: fx.Node) -> Callable[[tuple[tuple, dict]], Any]:
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            state = _real_state(module, self.device)
            if state is None:
                return lambda a: module(*a[0], **a[1])
            return lambda a: torch.func.functional_call(module, state, a[0], a[1], tie_weights=False, strict=False)
        if node.op == "call_method":
            return lambda a: getattr(a[0][0], node.target)(*a[0][1:], **a[1])
        return lambda a: node.target(*a[0], **a[1])


def _materialized(obj: Any, device: torch.device) -> Any:
    """A real stand-in for a meta tensor (random values, same shape and dtype), else ``obj`` on
    ``device``. Parameters stay Parameters so they are not detached as activations."""
    if not isinstance(obj, torch.Tensor):
        return obj
    if obj.device.type == "meta":
        real = (torch.randn(obj.shape, device=device, dtype=obj.dtype) * 0.02 if obj.is_floating_point()
                else torch.zeros(obj.shape, device=device, dtype=obj.dtype))
        return nn.Parameter(real, requires_grad=obj.requires_grad) if isinstance(obj, nn.Parameter) else real
    return obj if obj.device == device else obj.to(device)


def _real_state(module: nn.Module, device: torch.device) -> dict[str, torch.Tensor] | None:
    """Real stand-ins for a module's meta or off-device weights, or ``None`` if it can run as is."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    if all(t.device == device for _, t in named):
        return None
    return {name: _materialized(t, device) for name, t in named}
