"""Graph sharding: choose contiguous cuts of the compute sequence into pipeline stages.

Why cuts in a topological order: pipeline stages run one after another per micro-batch, so a
stage must be a contiguous run of the execution order; values produced before a cut and used after
it are sent (and forwarded through intermediate stages). The fx node order *is* the execution
order, and cutting at node granularity lets a cut fall between attention and MLP.

Why min-max, then traffic: the slowest stage sets the pipeline's step time, so the primary goal
is the smallest possible maximum stage cost. It is found exactly: binary search over the bound,
each step a vectorized reachability sweep (a stage's cost may include the transfer time of its
boundary cuts, if the cost model prices links). Among all cuttings within ``tolerance`` of that
optimum, a dynamic program then picks the one sending the fewest bytes (a cut between blocks
sends one hidden state; one inside attention would send q, k and v).

A cut is *invalid* where a crossing value is a container holding tensors (a ``split`` result
before its ``getitem``s) or between a value and an in-place update of it. Methods ``uniform``
and ``parameters`` mimic DeepSpeed (cuts only at layer starts; equal layer counts / balanced
parameter counts) and are scored with the same cost model, for comparison; ``manual`` takes cut
points by module or node name.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import numbers
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .cost_model import CostModel, FlopCostModel
from .proxy_graph import COMPUTE, OUTPUT, PARAM, REPLICATED, ProxyGraph, ProxyNode

__all__ = ["METHODS", "StageStats", "PartitionPlan", "shard"]

METHODS = ("cost", "parameters", "uniform", "manual")


@dataclasses.dataclass(frozen=True)
class StageStats:
    """What one stage holds and costs (per micro-batch of the traced shape)."""

    first_node: str
    last_node: str
    params: int
    flops: int
    activation_bytes: int
    cost: float
    send_bytes: int
    num_nodes: int
    first_module: str = ""
    last_module: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "first_node": self.first_node,
            "last_node": self.last_node,
            "params": self.params,
            "flops": self.flops,
            "activation_bytes": self.activation_bytes,
            "cost": self.cost,
            "send_bytes": self.send_bytes,
        }


class _Sequence:
    """The compute sequence with everything cut selection needs, as flat arrays.

    Position ``c`` in ``0..n`` is the cut before compute node ``c``; a stage ``[a, b)`` costs
    ``prefix[b] - prefix[a] + transfer[a] + transfer[b]`` (its nodes plus the time its boundary
    cuts keep it busy sending/receiving activations and their gradients).
    """

    def __init__(self, graph: ProxyGraph, cost_model: CostModel) -> None:
        self.graph = graph
        self.nodes: list[ProxyNode] = graph.compute_nodes
        n = len(self.nodes)
        self.n = n
        self.pos = {node.name: i for i, node in enumerate(self.nodes)}
        costs = np.array([cost_model.node_cost(node).total for node in self.nodes], dtype=np.float64)
        self.prefix = np.concatenate(([0.0], np.cumsum(costs)))
        self.last_use = self._last_uses()
        self.cut_bytes, moved_bytes, self.valid = self._cut_properties()
        self.transfer = np.array([cost_model.transfer_cost(int(b)) if 0 < c < n else 0.0
                                  for c, b in enumerate(moved_bytes)], dtype=np.float64)
        self.node_params = self._node_params()

    def _last_uses(self) -> dict[str, int]:
        """Last position (n = the output) at which each compute value is needed.

        A replicated node is recomputed in every stage that consumes it, so its inputs are needed
        up to its last (transitive) compute consumer.
        """
        by_name = self.graph.by_name
        effective: dict[str, int] = {}
        for node in reversed(self.graph.nodes):
            if node.role != REPLICATED:
                continue
            effective[node.name] = max((self._use_position(by_name[u], effective) for u in node.users), default=-1)
        last: dict[str, int] = {}
        for node in self.nodes:
            last[node.name] = max(
                (self._use_position(by_name[u], effective) for u in node.users), default=self.pos[node.name]
            )
        return last

    def _use_position(self, user: ProxyNode, effective: dict[str, int]) -> int:
        if user.role == COMPUTE:
            return self.pos[user.name]
        if user.role == OUTPUT:
            return self.n
        if user.role == REPLICATED and not user.device_query:  # a stage asks its own device
            return effective.get(user.name, -1)
        return -1

    def _cut_properties(self) -> tuple[list[int], list[int], np.ndarray]:
        """Per cut position: bytes sent forward, bytes moved both ways (activations plus their
        gradients), and whether the cut is valid (0 and n always are)."""
        n = self.n
        sent_delta = [0] * (n + 2)
        grad_delta = [0] * (n + 2)
        bad_delta = [0] * (n + 2)

        def span(delta: list[int], start: int, end: int, amount: int) -> None:
            delta[start + 1] += amount
            delta[min(end, n - 1) + 1] -= amount

        for node in self.nodes:
            p, last = self.pos[node.name], self.last_use[node.name]
            if last <= p:
                continue
            if node.is_tensor:
                span(sent_delta, p, last, node.output_bytes)
                if node.requires_grad:
                    span(grad_delta, p, last, node.output_bytes)
            if not node.sendable:
                span(bad_delta, p, last, 1)
        for node in self.nodes:  # never cut between a value and its in-place update
            if node.mutates in self.pos and self.pos[node.mutates] < self.pos[node.name]:
                span(bad_delta, self.pos[node.mutates], self.pos[node.name], 1)
        sent, moved, valid = [0] * (n + 1), [0] * (n + 1), np.zeros(n + 1, dtype=bool)
        running_sent = running_grad = running_bad = 0
        for c in range(1, n):
            running_sent += sent_delta[c]
            running_grad += grad_delta[c]
            running_bad += bad_delta[c]
            sent[c], moved[c], valid[c] = running_sent, running_sent + running_grad, running_bad == 0
        valid[0] = valid[n] = True
        return sent, moved, valid

    def _node_params(self) -> list[tuple[str, ...]]:
        by_name = self.graph.by_name
        result = []
        for node in self.nodes:
            params = list(node.params)
            for i in node.inputs:
                src = by_name[i]
                if src.role == PARAM:
                    params.extend(src.params)
            result.append(tuple(dict.fromkeys(params)))
        return result

    def range_cost(self, a: int, b: int) -> float:
        return float(self.prefix[b] - self.prefix[a] + self.transfer[a] + self.transfer[b])


def _feasible(prefix: np.ndarray, transfer: np.ndarray, valid: np.ndarray, k: int, bound: float) -> bool:
    """Can positions 0..n be split at valid cuts into exactly ``k`` stages each costing <= bound?

    Stage [a, b) fits iff ``prefix[a] - transfer[a] >= prefix[b] + transfer[b] - bound``, so the
    stages reachable with s+1 stages follow from a running maximum over those reachable with s.
    """
    key = np.where(valid, prefix - transfer, -np.inf)
    need = prefix + transfer - bound * (1 + 1e-12)
    reach = np.zeros(len(prefix), dtype=bool)
    reach[0] = True
    for _ in range(k):
        best_before = np.maximum.accumulate(np.where(reach, key, -np.inf))
        best_before = np.concatenate(([-np.inf], best_before[:-1]))  # starts a < b only
        reach = (best_before >= need) & valid
        reach[0] = False
    return bool(reach[-1])


def _min_max_bound(prefix: np.ndarray, transfer: np.ndarray, valid: np.ndarray, k: int) -> float:
    """The smallest achievable maximum stage cost (binary search over :func:`_feasible`)."""
    lo, hi = 0.0, float(prefix[-1] + 2 * transfer.max(initial=0.0))
    for _ in range(200):
        if hi - lo <= 1e-12 * max(hi, 1e-30):
            break
        mid = (lo + hi) / 2
        if _feasible(prefix, transfer, valid, k, mid):
            hi = mid
        else:
            lo = mid
    return hi


_BALANCE_TIE_BREAK = 1e-3  # bytes per (stage cost / bound)^2: orders equal-traffic cuttings only


def _min_traffic_cuts(seq: _Sequence, k: int, bound: float) -> list[int]:
    """Cuts (k+1 stage boundaries incl. 0 and n) minimizing the bytes sent over all cuts, with
    every stage costing <= bound; among equal traffic, the most even stages (least sum of squared
    costs), so stages beside an unsplittable bottleneck still share the rest evenly.
    A stage ending at b can only start at a with ``prefix[a] >= prefix[b] - bound``, so each end
    scans a window of about n/k starts."""
    prefix, transfer, valid, n = seq.prefix, seq.transfer, seq.valid, seq.n
    bound = bound * (1 + 1e-9)
    key = prefix - transfer
    sent = np.asarray(seq.cut_bytes, dtype=np.float64)
    sent[n] = 0.0
    starts_ok = valid.copy()
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    choices: list[np.ndarray] = []
    ends = np.flatnonzero(valid[1:]) + 1
    for stage in range(k):
        nxt = np.full(n + 1, np.inf)
        arg = np.full(n + 1, -1, dtype=np.int64)
        usable = np.where(starts_ok, best, np.inf)
        for b in ends if stage < k - 1 else (n,):
            lo = int(np.searchsorted(prefix, prefix[b] - bound, side="left"))
            if lo >= b:
                continue
            stage_cost = prefix[b] + transfer[b] - key[lo:b]
            window = np.where(stage_cost <= bound, usable[lo:b], np.inf)
            window = window + _BALANCE_TIE_BREAK * (stage_cost / bound) ** 2
            i = int(np.argmin(window))
            if window[i] < np.inf:
                nxt[b] = window[i] + sent[b]
                arg[b] = lo + i
        best = nxt
        choices.append(arg)
    if not np.isfinite(best[n]):
        raise RuntimeError("no partition meets the bound; this is a bug in the partitioner")
    cuts = [n]
    for arg in reversed(choices):
        cuts.append(int(arg[cuts[-1]]))
    return cuts[::-1]


@dataclasses.dataclass
class PartitionPlan:
    """Cut points of a :class:`ProxyGraph` into ``num_stages`` stages plus per-stage statistics.

    ``bounds[s]:bounds[s+1]`` are the positions of stage ``s`` in ``graph.compute_nodes``.
    """

    graph: ProxyGraph
    num_stages: int
    method: str
    cost_model: CostModel
    bounds: tuple[int, ...]
    stages: list[StageStats]
    seconds: float
    _seq: _Sequence | None = dataclasses.field(default=None, repr=False)

    @property
    def imbalance(self) -> float:
        costs = [s.cost for s in self.stages]
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean > 0 else 1.0

    def stage_of(self, name: str) -> int:
        """Stage that computes compute node ``name``."""
        pos = self._sequence().pos[name]
        return bisect.bisect_right(self.bounds, pos) - 1

    def stage_nodes(self, stage_id: int) -> list[ProxyNode]:
        self._check_stage(stage_id)
        return self.graph.compute_nodes[self.bounds[stage_id]:self.bounds[stage_id + 1]]

    def send_outputs(self, stage_id: int) -> tuple[str, ...]:
        """Names of values stage ``stage_id`` sends to the next (computed here or passed through)."""
        self._check_stage(stage_id)
        if stage_id == self.num_stages - 1:
            return ()
        seq = self._sequence()
        cut = self.bounds[stage_id + 1]
        return tuple(
            node.name for node in seq.nodes[:cut] if seq.last_use[node.name] >= cut
        )

    def recv_inputs(self, stage_id: int) -> tuple[str, ...]:
        self._check_stage(stage_id)
        return () if stage_id == 0 else self.send_outputs(stage_id - 1)

    def stage_parameters(self, stage_id: int) -> tuple[str, ...]:
        """Canonical names of the parameters stage ``stage_id`` uses."""
        seq = self._sequence()
        a, b = self.bounds[stage_id], self.bounds[stage_id + 1]
        return tuple(dict.fromkeys(p for params in seq.node_params[a:b] for p in params))

    def tied_stages(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter name -> stages holding it, for parameters held by several stages."""
        holders: dict[str, list[int]] = {}
        for s in range(self.num_stages):
            for p in self.stage_parameters(s):
                holders.setdefault(p, []).append(s)
        return {p: tuple(v) for p, v in holders.items() if len(v) > 1}

    def repriced(self, cost_model: CostModel) -> "PartitionPlan":
        """The same cut with its statistics (cost, imbalance) under ``cost_model``."""
        seq = _Sequence(self.graph, cost_model)
        stages = [_stage_stats(seq, a, b, self.graph) for a, b in zip(self.bounds, self.bounds[1:])]
        return dataclasses.replace(self, cost_model=cost_model, stages=stages, _seq=seq)

    def _sequence(self) -> _Sequence:
        if self._seq is None:
            self._seq = _Sequence(self.graph, self.cost_model)
        return self._seq

    def _check_stage(self, stage_id: int) -> None:
        if not 0 <= stage_id < self.num_stages:
            raise IndexError(f"stage_id {stage_id} out of range for a {self.num_stages}-stage plan")

    # ---- reporting ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "model": type(self.graph.model).__name__,
            "method": self.method,
            "num_stages": self.num_stages,
            "imbalance": self.imbalance,
            "seconds": self.seconds,
            "flavour": self.graph.flavour,
            "dynamic_shapes": self.graph.dynamic,
            "cost_model": self.cost_model.describe(),
            "stages": [s.to_json() for s in self.stages],
            "notes": list(self.graph.notes),
        }

    def table(self) -> str:
        """A readable table, one row per stage."""
        total = sum(s.cost for s in self.stages) or 1.0
        header = (f"{type(self.graph.model).__name__}: {self.num_stages} stages, method={self.method}, "
                  f"imbalance={self.imbalance:.3f} (max/mean cost), traced with {self.graph.flavour}"
                  f"{'' if self.graph.dynamic else ' (static shapes)'}, planned in {self.seconds:.1f}s\n"
                  f"cost model: {self.cost_model.describe()}")
        cols = ("stage", "first node", "last node", "params", "GFLOPs", "act MB", "send MB", "cost %")
        rows = []
        for i, s in enumerate(self.stages):
            rows.append((
                str(i),
                _node_label(s.first_node, s.first_module),
                _node_label(s.last_node, s.last_module),
                _human(s.params),
                f"{s.flops / 1e9:.2f}",
                f"{s.activation_bytes / 2**20:.1f}",
                f"{s.send_bytes / 2**20:.2f}",
                f"{100 * s.cost / total:.1f}",
            ))
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        align = ["r", "l", "l", "r", "r", "r", "r", "r"]

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)).rstrip()

        lines = [header, fmt(cols), fmt(["-" * w for w in widths])]
        lines += [fmt(r) for r in rows]
        for note in self.graph.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _node_label(name: str, module: str, width: int = 44) -> str:
    label = f"{name} ({module})" if module else name
    return label if len(label) <= width else label[: width - 1] + "…"


def _human(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


# ---- methods ----------------------------------------------------------------------------------------

def _check_num_stages(seq: _Sequence, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"num_stages must be a positive integer, got {k!r}")
    if seq.n == 0:
        raise ValueError(f"the traced graph of {type(seq.graph.model).__name__} has no compute nodes (no "
                         "parameterised or costly ops), so there is nothing to place on pipeline stages")
    cuttable = int(seq.valid[1:seq.n].sum())
    if k - 1 > cuttable:
        raise ValueError(
            f"num_stages={k} needs {k - 1} cut points but the graph of {type(seq.graph.model).__name__} "
            f"has only {cuttable} valid cut positions among {seq.n} compute nodes; use at most "
            f"{cuttable + 1} stages"
        )


def _cost_cuts(seq: _Sequence, k: int, tolerance: float) -> list[int]:
    bound = _min_max_bound(seq.prefix, seq.transfer, seq.valid, k)
    return _min_traffic_cuts(seq, k, bound * (1 + tolerance))


def _layer_units(seq: _Sequence) -> list[int]:
    """Start positions of repeated layers in the compute sequence, plus the start of the tail
    (first node after the last layer). Empty when the model has no repeated layers."""
    first: dict[str, int] = {}
    last_pos = -1
    for i, node in enumerate(seq.nodes):
        if node.layer is not None:
            first.setdefault(node.layer, i)
            last_pos = i
    return sorted(first.values()) + ([last_pos + 1] if first else [])


def _next_valid(seq: _Sequence, pos: int) -> int:
    while pos < seq.n and not seq.valid[pos]:
        pos += 1
    return pos


def _uniform_cuts(seq: _Sequence, k: int) -> list[int]:
    """DeepSpeed-style: equal numbers of layers per stage (the first stages take the remainder);
    nodes before the first layer join stage 0 and nodes after the last layer the last stage."""
    starts = _layer_units(seq)[:-1]
    layers = len(starts)
    if layers == 0:
        raise ValueError("method 'uniform' needs repeated layers (an nn.ModuleList of identical blocks); "
                         f"none found in {type(seq.graph.model).__name__}; use method='cost'")
    if k > layers:
        raise ValueError(f"method 'uniform' cannot make {k} stages from {layers} layers; use method='cost'")
    per, extra = divmod(layers, k)
    cuts, index = [0], 0
    for s in range(k - 1):
        index += per + (1 if s < extra else 0)
        cuts.append(_next_valid(seq, starts[index]))
    cuts.append(seq.n)
    return cuts


def _parameter_cuts(seq: _Sequence, k: int) -> list[int]:
    """DeepSpeed-style: cuts at layer boundaries balancing parameter bytes (embeddings before
    the first layer and the head after the last count as units of their own)."""
    bounds = _layer_units(seq)
    if not bounds:
        raise ValueError("method 'parameters' needs repeated layers (an nn.ModuleList of identical blocks); "
                         f"none found in {type(seq.graph.model).__name__}; use method='cost'")
    edges = sorted(set([0, *bounds, seq.n]))
    units = [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
    if k > len(units):
        raise ValueError(f"method 'parameters' cannot make {k} stages from {len(units)} layer units; use method='cost'")
    weights = []
    for a, b in units:
        params = {p for ps in seq.node_params[a:b] for p in ps}
        weights.append(float(sum(seq.graph.param_bytes[p] for p in params)))
    prefix = np.concatenate(([0.0], np.cumsum(weights)))
    bound = _min_max_bound(prefix, np.zeros(len(prefix)), np.ones(len(prefix), dtype=bool), k)
    # Greedy at the bound (exact for additive weights), then split the widest stages up to k.
    unit_cuts, i = [0], 0
    while i < len(units):
        j = int(np.searchsorted(prefix, prefix[i] + bound * (1 + 1e-9), side="right")) - 1
        unit_cuts.append(min(max(j, i + 1), len(units)))
        i = unit_cuts[-1]
    while len(unit_cuts) - 1 < k:
        widest = max(range(len(unit_cuts) - 1), key=lambda s: unit_cuts[s + 1] - unit_cuts[s])
        unit_cuts.insert(widest + 1, (unit_cuts[widest] + unit_cuts[widest + 1]) // 2)
    return [0] + [_next_valid(seq, units[u][0]) for u in unit_cuts[1:-1]] + [seq.n]


def _manual_cuts(seq: _Sequence, k: int, names: Sequence[str] | None) -> list[int]:
    """Stage s+1 starts at ``names[s]``: the first compute node of that module (or that node)."""
    if not names or len(names) != k - 1:
        raise ValueError(f"method 'manual' needs manual_cuts with {k - 1} names (where stages 1..{k - 1} "
                         f"start), got {list(names or [])}")
    modules = {node.module for node in seq.nodes}
    cuts = [0]
    for name in names:
        pos = next((i for i, node in enumerate(seq.nodes)
                    if node.module == name or node.module.startswith(name + ".")), None)
        if pos is None:
            pos = seq.pos.get(name)
        if pos is None:
            candidates = sorted(modules | set(seq.pos))
            close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"manual cut {name!r} is neither a module nor a node of the traced graph{hint}")
        if pos == 0:
            raise ValueError(f"manual cut {name!r} is at the very first node; stage 0 would be empty")
        if not seq.valid[pos]:
            raise ValueError(f"manual cut {name!r} falls where a tuple of tensors or an in-place update "
                             "would cross stages; cut at the enclosing module instead")
        if pos <= cuts[-1]:
            raise ValueError(f"manual cuts must be in execution order and distinct; {name!r} is not after "
                             f"the previous cut")
        cuts.append(pos)
    cuts.append(seq.n)
    return cuts


def shard(
    graph: ProxyGraph,
    num_stages: int,
    method: str = "cost",
    cost_model: CostModel | None = None,
    manual_cuts: Sequence[str] | None = None,
    tolerance: float = 0.01,
) -> PartitionPlan:
    """Cut ``graph`` into ``num_stages`` pipeline stages.

    ``method``: ``"cost"`` (default; min-max of cost-model time at node granularity; among
    cuttings within ``tolerance`` of the optimum, the least traffic), ``"parameters"`` / ``"uniform"`` (DeepSpeed-like,
    at layer starts) or ``"manual"`` (``manual_cuts``: the module or node names where stages
    1..N-1 begin). ``cost_model`` defaults to :class:`FlopCostModel`.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cost_model = cost_model or FlopCostModel()
    seq = _Sequence(graph, cost_model)
    _check_num_stages(seq, num_stages)
    num_stages = int(num_stages)
    if method == "cost":
        cuts = _cost_cuts(seq, num_stages, tolerance)
    elif method == "uniform":
        cuts = _uniform_cuts(seq, num_stages)
    elif method == "parameters":
        cuts = _parameter_cuts(seq, num_stages)
    else:
        cuts = _manual_cuts(seq, num_stages, manual_cuts)
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"method {method!r} produced an empty stage for {num_stages} stages; use fewer stages "
                         "or method='cost'")
    stages = [_stage_stats(seq, a, b, graph) for a, b in zip(cuts, cuts[1:])]
    seconds = time.perf_counter() - start + getattr(graph, "trace_seconds", 0.0)
    return PartitionPlan(graph=graph, num_stages=num_stages, method=method, cost_model=cost_model,
                         bounds=tuple(cuts), stages=stages, seconds=seconds, _seq=seq)


def _stage_stats(seq: _Sequence, a: int, b: int, graph: ProxyGraph) -> StageStats:
    nodes = seq.nodes[a:b]
    params = {p for ps in seq.node_params[a:b] for p in ps}
    return StageStats(
        first_node=nodes[0].name,
        last_node=nodes[-1].name,
        first_module=nodes[0].module,
        last_module=nodes[-1].module,
        params=sum(graph.param_numel[p] for p in params),
        flops=sum(n.flops for n in nodes),
        activation_bytes=sum(n.output_bytes for n in nodes if n.requires_grad and n.memory_bytes > 0),
        cost=seq.range_cost(a, b),
        send_bytes=seq.cut_bytes[b] if b < seq.n else 0,
        num_nodes=len(nodes),
    )
