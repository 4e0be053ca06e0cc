"""Search over layouts with the cluster simulator: the best strategy a system can run.

Why a search module of its own: the planner (``python -m merak.planner``) and the Merak-paper
benchmark ask the same question - "what is the fastest way to train this model with this
batch on this cluster, given what the system can do?" - and differ only in what "the system"
may choose (a :class:`SearchSpace`: schedules, recomputation modes, micro-batches,
sub-micro-batches, partition method and the runtime's fixed habits).

Candidates are every ``dp x tp x pp`` that fills the cluster (tp within a node, tp accepted by
the TP planner, pp at most the number of layers) times the space's choices, with at least
``pp`` micro-batches per step. Each gets a cheap lower bound on its step time (M x its busiest
stage's compute, from the partition alone: :func:`~merak.planner.simulator.lower_bound`);
in that order each is then planned (:func:`~merak.planner.simulator.plan_step`: recompute
plan, schedule, memory), refused when it does not fit the device, and otherwise simulated. The
search stops once the bound reaches the ``keep``-th best step found (branch and bound: the
answer is the same as simulating everything; candidates never planned are counted as pruned).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterator, Sequence

from merak.planner.cluster import Cluster
from merak.planner.simulator import Prediction, Strategy, TracedModel, lower_bound, plan_step, predict

__all__ = ["SearchSpace", "SearchResult", "layouts", "search"]


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What a system may choose; ``template`` carries the fields it may not (partition method,
    DP overlap, precision, recomputation granularity, ZeRO-1)."""

    schedules: tuple[str, ...] = ("1f1b", "shifted_critical_path", "zero_bubble")
    recomputes: tuple[str, ...] = ("none", "full", "stage_aware")
    micro_batches: tuple[int, ...] = (1, 2, 4, 8)
    tp_sub_microbatches: tuple[int, ...] = (1, 2, 4)
    moe_modes: tuple[str, ...] = ("tensor", "expert")  # tried only for models with expert banks
    tp_degrees: tuple[int, ...] | None = None
    pp_degrees: tuple[int, ...] | None = None
    template: Strategy = Strategy()


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The best fitting predictions (fastest first), and what the search refused or pruned."""

    best: tuple[Prediction, ...]
    candidates: int
    refused_memory: int
    pruned: int
    invalid: tuple[str, ...]


def layouts(devices: int, gpus_per_node: int, valid_tp: Sequence[int], max_pp: int,
            tp_degrees: Sequence[int] | None = None,
            pp_degrees: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
    """Every (dp, tp, pp) with ``dp * tp * pp == devices``, tp within a node and valid for the
    model, pp <= ``max_pp``."""
    out = []
    for tp in valid_tp:
        if tp > gpus_per_node or devices % tp or (tp_degrees and tp not in tp_degrees):
            continue
        for pp in range(1, min(max_pp, devices // tp) + 1):
            if (devices // tp) % pp or (pp_degrees and pp not in pp_degrees):
                continue
            out.append((devices // (tp * pp), tp, pp))
    return out


def _strategies(model: TracedModel, cluster: Cluster, global_batch: int, space: SearchSpace) -> Iterator[Strategy]:
    valid_tp = model.valid_tp(cluster.gpus_per_node)
    for dp, tp, pp in layouts(cluster.num_devices, cluster.gpus_per_node, valid_tp, model.layers,
                              space.tp_degrees, space.pp_degrees):
        for b in space.micro_batches:
            if global_batch % (dp * b) or global_batch // (dp * b) < pp:
                continue
            for k in (space.tp_sub_microbatches if tp > 1 else (1,)):
                if b % k:
                    continue
                for moe in _moe_modes(model, tp, space):
                    for schedule in space.schedules:
                        for recompute in space.recomputes:
                            yield dataclasses.replace(space.template, dp=dp, tp=tp, pp=pp, micro_batch=b,
                                                      schedule=schedule, recompute=recompute, tp_sub_microbatches=k,
                                                      moe=moe)


def _moe_modes(model: TracedModel, tp: int, space: SearchSpace) -> Iterator[str]:
    """The MoE modes worth pricing at ``tp``: all of ``space.moe_modes`` the planner accepts when
    the model has expert banks, else just the template's (the choice changes nothing)."""
    try:
        banks = tp > 1 and bool(model.tp_plan(tp, space.template.moe).experts)
    except ValueError:  # the template's mode refuses a bank; another mode may not
        banks = True
    if not banks:
        yield space.template.moe
        return
    for moe in space.moe_modes:
        try:
            model.tp_plan(tp, moe)
        except ValueError:
            continue
        yield moe


def search(model: TracedModel, cluster: Cluster, global_batch: int, space: SearchSpace = SearchSpace(),
           keep: int = 5) -> SearchResult:
    """The ``keep`` fastest strategies of ``space`` that fit (see the module docstring)."""
    bounded: list[tuple[float, int, Strategy]] = []
    invalid: list[str] = []
    candidates = 0
    for strategy in _strategies(model, cluster, global_batch, space):
        candidates += 1
        try:
            bounded.append((lower_bound(model, strategy, global_batch, cluster), candidates, strategy))
        except ValueError as exc:  # e.g. a stage with no layer to cut (pp too deep for the graph)
            invalid.append(f"{strategy.label()}: {exc}")
    bounded.sort(key=lambda t: (t[0], t[1]))
    best: list[tuple[float, int, Prediction]] = []  # max-heap on step time via negation
    refused = pruned = 0
    for i, (bound, order, strategy) in enumerate(bounded):
        if len(best) == keep and bound >= -best[0][0]:
            pruned = len(bounded) - i
            break
        sp = plan_step(model, strategy, global_batch, cluster)
        if not sp.fits:
            refused += 1
            continue
        p = predict(model, strategy, global_batch, cluster, sp)
        item = (-p.step_seconds, order, p)
        if len(best) < keep:
            heapq.heappush(best, item)
        elif p.step_seconds < -best[0][0]:
            heapq.heapreplace(best, item)
    ranked = tuple(p for _, _, p in sorted(best, key=lambda t: (-t[0], t[1])))
    return SearchResult(ranked, candidates, refused, pruned, tuple(invalid))
