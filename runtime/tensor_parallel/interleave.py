"""Sub-pipelined tensor parallelism: overlap one sub-micro-batch's all-reduce with another's compute.

With ``tp_sub_microbatches = k > 1`` a stage splits each micro-batch along the batch into k
sub-micro-batches and runs its graph **segment by segment**: the graph is cut at every
tensor-parallel collective, and segment ``s`` runs for sub-micro-batch 0, 1, ..., k-1 before
segment ``s+1`` starts. A collective is *launched* at the end of a segment and *waited for* at
the start of the next, so:

* **forward** (row-parallel and vocab-embedding all-reduces): sub-micro-batch j's all-reduce is
  in flight while sub-micro-batches j+1.. compute the same segment (and, for the last one, while
  sub-micro-batch 0 computes the next segment);
* **backward** (the input-gradient all-reduce of ``copy``, the all-gather of ``scatter``): each is
  split into two autograd nodes, a *wait* created at the end of segment s and a *launch* created
  at the start of segment s+1 (:class:`~merak.runtime.tensor_parallel.layers.GradPair`). Autograd runs ready
  nodes latest-created first, so in backward sub-micro-batch j's launch is followed by the other
  sub-micro-batches' backward of segment s+1 (or of segment s, for j = 0) before its wait.

Results equal ``k = 1`` up to floating-point summation order: every op runs on a batch slice of
the same values. The one non-linear combination is a **mean** loss over tokens with ignored
labels (HF's cross-entropy): the runner cuts the graph at such a loss too, computes each
sub-micro-batch's *sum* and count, and divides by the count over the whole micro-batch, so the
loss and its gradient are those of the full micro-batch. (Dropout masks differ from k = 1, as
they are drawn per slice: same distribution, other numbers.)

Outputs are reassembled: batched tensors concatenated, loss-derived scalars summed, other
scalars averaged, anything else taken from the first sub-micro-batch (values that do not depend
on the batch, e.g. T5's position bias, are identical in every slice).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from merak.partitioner.tracer import resolve_path
from merak.runtime.tensor_parallel.layers import (
    AsyncForward,
    CopyToTP,
    ForwardReduceLayer,
    ScatterToTP,
    VocabParallelCrossEntropy,
)

logger = logging.getLogger(__name__)

__all__ = ["SubMicrobatchRunner", "install_sub_microbatching"]


def install_sub_microbatching(stage: nn.Module, k: int) -> "SubMicrobatchRunner":
    """Make ``stage``'s forward the interleaved runner (an instance attribute; the graph is kept)."""
    runner = SubMicrobatchRunner(stage, k)
    stage.forward = runner  # type: ignore[method-assign]
    stage.tp_sub_microbatches = k
    if hasattr(stage, "_STAGE_ATTRIBUTES"):  # StageModule.__deepcopy__ carries the runner over
        stage._STAGE_ATTRIBUTES = tuple(dict.fromkeys((*stage._STAGE_ATTRIBUTES, "forward")))
    return runner


class SubMicrobatchRunner:
    """Runs ``stage``'s graph on ``k`` batch slices, segment-major (see the module docstring)."""

    def __init__(self, stage: nn.Module, k: int) -> None:
        if k < 1:
            raise ValueError(f"tp_sub_microbatches={k} must be >= 1")
        self.stage, self.k = stage, k
        self._analyze()

    def __deepcopy__(self, memo: dict[int, Any]) -> "SubMicrobatchRunner":
        # fx nodes must not be deep-copied one by one (their meta holds traced values); the copy
        # re-analyzes the copied stage's graph when first called (the stage may still be under
        # construction here, as GraphModule deep-copies its attributes first).
        new = SubMicrobatchRunner.__new__(SubMicrobatchRunner)
        memo[id(self)] = new
        new.stage, new.k, new.nodes = copy.deepcopy(self.stage, memo), self.k, None
        return new

    def _analyze(self) -> None:
        stage = self.stage
        plan = getattr(stage, "tp_plan", None)
        self.batch_values = plan.batch_values if plan is not None else frozenset()
        graph: fx.Graph = stage.graph
        self.nodes = list(graph.nodes)
        self.cuts: dict[fx.Node, str] = {}
        for node in self.nodes:
            kind = self._cut_kind(node)
            if kind:
                self.cuts[node] = kind
        self.segments: list[list[fx.Node]] = [[]]
        for node in self.nodes:
            self.segments[-1].append(node)
            if node in self.cuts:
                self.segments.append([])
        position = {n: i for i, n in enumerate(self.nodes)}
        self.last_use: dict[fx.Node, int] = {}
        for node in self.nodes:
            for inp in node.all_input_nodes:
                self.last_use[inp] = max(self.last_use.get(inp, -1), position[node])
        self.position = position
        self.output = next(n for n in self.nodes if n.op == "output")
        self.additive = self._loss_derived_outputs()

    # ---- graph analysis ------------------------------------------------------------------------
    def _cut_kind(self, node: fx.Node) -> str | None:
        if node.op == "call_module":
            module = self.stage.get_submodule(str(node.target))
            if isinstance(module, ForwardReduceLayer):
                return "reduce"
            if isinstance(module, CopyToTP):
                return "copy"
            if isinstance(module, ScatterToTP):
                return "scatter"
            if isinstance(module, VocabParallelCrossEntropy) and node.kwargs.get("reduction", "mean") == "mean":
                return "loss"
            if isinstance(module, nn.CrossEntropyLoss) and module.reduction == "mean":
                return "loss"
        if node.op == "call_function" and node.target is F.cross_entropy and \
                node.kwargs.get("reduction", "mean") == "mean" and len(node.args) <= 2:
            return "loss"
        return None

    def _loss_derived_outputs(self) -> set[str]:
        """Output keys whose (scalar) value is computed from a mean-loss cut: summed over slices."""
        value = self.output.args[0]
        if not isinstance(value, dict):
            return set()
        loss_nodes = {n for n, kind in self.cuts.items() if kind == "loss"}
        out = set()
        for key, v in value.items():
            if not isinstance(v, fx.Node):
                continue
            stack, seen = [v], set()
            while stack:
                n = stack.pop()
                if n in seen:
                    continue
                seen.add(n)
                if n in loss_nodes:
                    out.add(key)
                    break
                stack.extend(n.all_input_nodes)
        return out

    # ---- running -------------------------------------------------------------------------------
    def __call__(self, data: Mapping[str, Any], received: Mapping[str, Any]) -> dict[str, Any]:
        if self.nodes is None:
            self._analyze()
        batch = self._batch_size(data, received)
        # A batch that does not split into k equal parts (the tail of an evaluation set; the trainer
        # refuses such a training micro-batch) runs whole: same values, no overlap for that one.
        if batch is None or self.k == 1 or batch % self.k:
            return type(self.stage).forward(self.stage, data, received)
        datas = self._split(data, batch, names=None)
        recvs = self._split(received, batch, names=self.batch_values)
        envs: list[dict[fx.Node, Any]] = [{} for _ in range(self.k)]
        pending: list[Any] = [None] * self.k
        loss_counts: dict[fx.Node, list[torch.Tensor]] = {}
        for segment in self.segments:
            for j in range(self.k):
                env = envs[j]
                if pending[j] is not None:
                    node, finish = pending[j]
                    env[node] = finish()
                    pending[j] = None
                for node in segment:
                    if node.op == "placeholder":
                        env[node] = datas[j] if node.target == "data" else recvs[j]
                    elif node in self.cuts:
                        pending[j] = (node, self._start(node, env, loss_counts))
                    else:
                        env[node] = self._run(node, env)
                    self._free(node, env)
        return self._combine([env[self.output] for env in envs], batch)

    def _batch_size(self, data: Mapping[str, Any], received: Mapping[str, Any]) -> int | None:
        for value in data.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
        for name, value in received.items():
            if name in self.batch_values and isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
        return None

    def _split(self, values: Mapping[str, Any], batch: int, names: frozenset[str] | None) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{} for _ in range(self.k)]
        for key, value in values.items():
            batched = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch \
                and (names is None or key in names)
            chunks = value.chunk(self.k) if batched else [value] * self.k
            for j in range(self.k):
                parts[j][key] = chunks[j]
        return parts

    def _args(self, node: fx.Node, env: dict[fx.Node, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return fx.node.map_arg(node.args, env.__getitem__), fx.node.map_arg(node.kwargs, env.__getitem__)

    def _run(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        if node.op == "get_attr":
            return resolve_path(self.stage, str(node.target))
        args, kwargs = self._args(node, env)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.stage.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "output":
            return args[0]
        raise RuntimeError(f"unexpected node {node.format_node()}")

    def _free(self, node: fx.Node, env: dict[fx.Node, Any]) -> None:
        i = self.position[node]
        for inp in node.all_input_nodes:
            if self.last_use.get(inp) == i and inp is not self.output:
                env.pop(inp, None)

    def _start(self, node: fx.Node, env: dict[fx.Node, Any], loss_counts: dict[fx.Node, list[torch.Tensor]]) -> Any:
        """Begin a cut op for one slice; returns the closure that finishes it in the next segment."""
        kind = self.cuts[node]
        args, kwargs = self._args(node, env)
        if kind == "reduce":
            module: Any = self.stage.get_submodule(str(node.target))
            comm = AsyncForward(module.tpg)
            pending = comm.start(module.partial(*args, **kwargs))
            return lambda: module.finish(comm.finish(pending))
        if kind in ("copy", "scatter"):
            module = self.stage.get_submodule(str(node.target))
            pair = module.pair(args[1] if kind == "scatter" else None)
            waited = pair.wait_op(args[0])
            return lambda: pair.launch_op(waited)
        # a mean loss: this slice's sum now, divided by the whole micro-batch's count later
        total, count = self._loss_sum(node, args, kwargs)
        counts = loss_counts.setdefault(node, [])
        counts.append(count)

        def finish() -> torch.Tensor:
            return total / torch.stack(counts).sum()

        return finish

    def _loss_sum(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, target = args[0], args[1]
        if node.op == "call_module":
            module = self.stage.get_submodule(str(node.target))
            if isinstance(module, VocabParallelCrossEntropy):
                ignore = kwargs.get("ignore_index", -100)
                total = module(logits, target, ignore_index=ignore, reduction="sum")
                return total, (target != ignore).sum()
            opts = {"weight": module.weight, "ignore_index": module.ignore_index,
                    "label_smoothing": module.label_smoothing}
        else:
            opts = {k: v for k, v in kwargs.items() if k in ("weight", "ignore_index", "label_smoothing")}
        total = F.cross_entropy(logits, target, reduction="sum", **opts)
        ignore = opts.get("ignore_index", -100)
        valid = target != ignore
        weight = opts.get("weight")
        if weight is not None and target.dtype != torch.float:
            count = (weight[target.clamp_min(0)] * valid).sum()
        else:
            count = valid.sum()
        return total, count

    def _combine(self, outs: list[Any], batch: int) -> dict[str, Any]:
        first = outs[0]
        if not isinstance(first, dict):
            raise TypeError("a stage graph returns a dict")
        spec = self.output.args[0]
        result: dict[str, Any] = {}
        for key, value in first.items():
            values = [o[key] for o in outs]
            node = spec.get(key) if isinstance(spec, dict) else None
            if not isinstance(value, torch.Tensor):
                result[key] = value
            elif key in self.additive and value.dim() == 0:
                result[key] = torch.stack(values).sum()
            elif value.dim() > 0 and isinstance(node, fx.Node) and node.name in self.batch_values and \
                    value.shape[0] * self.k == batch:
                result[key] = torch.cat(values, dim=0)
            elif value.dim() == 0 and value.is_floating_point():
                result[key] = torch.stack(values).mean()
            else:
                result[key] = value
        return result
