"""Choosing each layer's activation action so every stage fits a memory budget.

Why per stage: in a pipeline, stage ``s`` holds more micro-batches in flight than stage ``s+1``
(1F1B: ``P - s``), so one global rule either wastes the memory of late stages or overflows early
ones. :func:`plan_activations` decides stage by stage, with the estimator
(:class:`~merak.runtime.memory.estimator.MemoryModel`) as the judge of every candidate: it walks the stage's
real instruction list for that candidate, so what the schedule keeps, recomputes or spares is
priced exactly as it will run.

* ``stage_aware`` with a budget: each stage recomputes the fewest layers that fit, its earliest
  layers first (their saved tensors wait longest for their backward). Later stages, with fewer
  micro-batches in flight, end up recomputing fewer layers or none.
* ``offload=True`` adds host memory as a third choice (see :func:`_choose_with_offload`).
* ``none`` / ``full`` / ``selective`` with a budget are checked, not changed.

A budget that no candidate meets raises :class:`MemoryBudgetError` naming the smallest budget
that does fit (the largest over stages of each stage's least-memory candidate, so that budget is
feasible and one byte less is not) and the ways to lower it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from merak.partitioner.cost_model import CostModel, FlopCostModel
from merak.runtime.memory.activation_profile import LayerFootprint, StageFootprint
from merak.runtime.memory.policy import ActivationPlan, LayerAction, stage_layers
from merak.runtime.memory.estimator import Layout, MemoryModel, StageMemory, format_bytes
from merak.runtime.memory.recompute_plan import RECOMPUTE_MODES

__all__ = ["MemoryBudgetError", "plan_activations", "DEFAULT_HOST_LINK_BYTES_PER_S"]

#: Host <-> device bandwidth assumed for offload: a PCIe 4.0 x16 link (~25 GB/s achieved).
DEFAULT_HOST_LINK_BYTES_PER_S = 25e9


class MemoryBudgetError(ValueError):
    """No activation plan fits the memory budget; the message gives the smallest budget that fits.

    ``min_budget_bytes`` is that budget, ``stage`` the stage that needs it.
    """

    def __init__(self, message: str, min_budget_bytes: int, stage: int) -> None:
        super().__init__(message)
        self.min_budget_bytes, self.stage = min_budget_bytes, stage


def plan_activations(
    sharding_plan: Any,
    layout: Layout,
    mode: str,
    budget_bytes: int | None = None,
    *,
    offload: bool = False,
    host_link_bytes_per_s: float = DEFAULT_HOST_LINK_BYTES_PER_S,
    cost_model: CostModel | None = None,
    memory: MemoryModel | None = None,
) -> ActivationPlan:
    """The :class:`ActivationPlan` for ``mode`` (``none | full | selective | stage_aware``) under
    ``budget_bytes`` per device (``None``: the mode's fixed rule, nothing checked).

    ``offload`` lets the planner move layers' activations to host memory
    (``host_link_bytes_per_s``), priced against recomputation with ``cost_model`` (default: the
    partitioner's FLOP roofline). ``memory`` reuses an existing estimator of the same plan and
    layout. Raises :class:`MemoryBudgetError` when nothing fits.
    """
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"unknown recompute mode {mode!r}; choose one of {RECOMPUTE_MODES}")
    if offload and budget_bytes is None:
        raise ValueError("activation offload is chosen against a memory budget; give max_memory_per_device "
                         "(--budget), or leave offload off")
    if offload and mode != "stage_aware":
        raise ValueError(f"activation offload is planned per layer by the stage-aware planner; use "
                         f"recompute='stage_aware' with offload (got {mode!r})")
    placement = layout.placement
    chunked = placement.num_chunks > 1 and sharding_plan.num_stages == placement.num_virtual
    if budget_bytes is None:
        if chunked and mode == "stage_aware":
            from merak.runtime.memory.stage_aware import stage_aware_layers

            return stage_aware_layers(sharding_plan, layout.schedule, layout.pp, layout.num_microbatches,
                                      placement.num_chunks)
        return ActivationPlan.from_mode(mode, sharding_plan)
    memory = memory or MemoryModel(sharding_plan, layout)
    layers = stage_layers(sharding_plan)
    if mode != "stage_aware":
        plan = ActivationPlan.from_mode(mode, sharding_plan)
        _check_fixed(memory, plan, budget_bytes, mode)
        return plan
    if memory.per_chunk:
        if offload:
            raise ValueError(f"activation offload is planned per stage, not yet per model chunk: with "
                             f"schedule={layout.schedule!r} ({placement}) leave activation_offload off (the budget "
                             f"is then met by recomputation per chunk), or use a schedule without virtual stages")
        return _fewest_recomputed_per_chunk(memory, layers, budget_bytes)
    if offload:
        times = _LayerTimes(sharding_plan, memory, cost_model or FlopCostModel())
        choose = lambda s: _choose_with_offload(memory, layers, s, budget_bytes, times, host_link_bytes_per_s)  # noqa: E731
    else:
        choose = lambda s: _fewest_recomputed(memory, layers, s, budget_bytes)  # noqa: E731
    chosen: list[dict[str, LayerAction]] = []
    shortfalls: list[tuple[int, StageMemory]] = []
    for stage in range(sharding_plan.num_stages):
        actions, best = choose(stage)
        if actions is None:
            shortfalls.append((stage, best))
        chosen.append(actions or {})
    if shortfalls:
        raise _budget_error(memory, budget_bytes, shortfalls, offload)
    return ActivationPlan(tuple(chosen), layers)


# ---- stage-aware recomputation ------------------------------------------------------------------
def _single_stage(layers: Sequence[Sequence[str]], stage: int, actions: Mapping[str, LayerAction]) -> ActivationPlan:
    """A plan with ``actions`` on ``stage`` and everything kept elsewhere (a stage's schedule
    and memory depend only on its own plan)."""
    return ActivationPlan(tuple(dict(actions) if s == stage else {} for s in range(len(layers))), tuple(layers))


def _fewest_recomputed(memory: MemoryModel, layers: Sequence[Sequence[str]], stage: int,
                       budget: int) -> tuple[dict[str, LayerAction] | None, StageMemory]:
    """Recompute the first ``c`` layers of the stage for the smallest ``c`` that fits.

    Returns ``(actions, estimate)`` or ``(None, least-memory estimate)`` when none fits.
    """
    names = layers[stage]
    best: StageMemory | None = None
    for count in range(len(names) + 1):
        actions = {name: LayerAction.RECOMPUTE for name in names[:count]}
        estimate = memory.stage_memory(_single_stage(layers, stage, actions), stage)
        if estimate.total_bytes <= budget:
            return actions, estimate
        if best is None or estimate.total_bytes < best.total_bytes:
            best = estimate
    assert best is not None
    return None, best


# ---- stage-aware recomputation with virtual stages ----------------------------------------------------
def _counted(layers: Sequence[Sequence[str]], counts: Sequence[int]) -> ActivationPlan:
    """Each virtual stage recomputes its first ``counts[k]`` layers."""
    return ActivationPlan(tuple({n: LayerAction.RECOMPUTE for n in names[:c]} for names, c in zip(layers, counts)),
                          tuple(layers))


def _fewest_recomputed_per_chunk(memory: MemoryModel, layers: Sequence[Sequence[str]], budget: int) -> ActivationPlan:
    """``stage_aware`` under a budget when a rank holds several chunks: the rank is what must fit
    (its chunks' parameters, optimizer states and activations share one device).

    Greedy, one layer at a time: while a rank is over the budget, the one of its chunks whose
    next recomputed layer (its earliest kept one) lowers the rank's estimate most recomputes it
    (ties: the chunk with more micro-batches in flight, then the earlier one). Ranks are sized
    together, because a virtual-stage schedule spares recomputation under a budget that depends
    on every rank's plan (1F1B's peak with it); recomputing more anywhere never raises a rank's
    estimate, so the loop ends. A rank over the budget with every layer recomputed raises
    :class:`MemoryBudgetError` naming the smallest budget that fits: the largest rank with every
    layer of every chunk recomputed (that budget passes, one byte less cannot).
    """
    counts = [0] * len(layers)
    placement = memory.placement
    while True:
        plan = _counted(layers, counts)
        over = [m for m in memory.estimate(plan) if m.total_bytes > budget]
        if not over:
            return plan
        stuck = []
        for m in over:
            rank = m.stage
            open_chunks = [k for k in placement.chunks_of(rank) if counts[k] < len(layers[k])]
            if not open_chunks:
                stuck.append(m)
                continue

            def after(k: int) -> tuple[int, int, int]:
                trial = list(counts)
                trial[k] += 1
                estimate = memory.stage_memory(_counted(layers, trial), rank)
                return estimate.total_bytes, -_chunk_inflight(memory, plan, rank, k), k

            counts[min(open_chunks, key=after)] += 1
        if stuck:
            everything = _counted(layers, [len(names) for names in layers])
            least = memory.estimate(everything)
            short = [(m.stage, m) for m in least if m.total_bytes > budget]
            if not short:  # fits once every rank recomputes all: the others' plans held this rank back
                return everything
            raise _budget_error(memory, budget, short, offload=False)


def _chunk_inflight(memory: MemoryModel, plan: ActivationPlan, rank: int, virtual_stage: int) -> int:
    """Peak micro-batches in flight of one chunk on its rank's instruction list."""
    from merak.runtime.pipeline.schedules.memory import chunk_peak_inflight

    chunk = memory.placement.locate(virtual_stage)[1]
    return chunk_peak_inflight(memory.instructions(plan, rank), memory.num_chunks)[chunk]


# ---- offload chooser ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _LayerTimes:
    """Forward seconds per micro-batch of each stage and of each layer part (cost model, 1/tp for
    tensor-parallel nodes), plus the stage's backward seconds: what offload transfers hide under."""

    forward: dict[tuple[int, str], float]
    stage_forward: list[float]
    stage_backward: list[float]

    def __init__(self, plan: Any, memory: MemoryModel, cost_model: CostModel) -> None:
        sharded = memory.footprints[0].sharded_nodes
        tp = memory.layout.tp

        def cost(name: str) -> tuple[float, float]:
            c = cost_model.node_cost(plan.graph.node(name))
            scale = 1 / tp if name in sharded else 1.0
            return c.forward * scale, c.backward * scale

        self.forward, self.stage_forward, self.stage_backward = {}, [], []
        for s, fp in enumerate(memory.footprints):
            costs = [cost(n.name) for n in plan.stage_nodes(s)]
            self.stage_forward.append(sum(f for f, _ in costs))
            self.stage_backward.append(sum(b for _, b in costs))
            for part in fp.layers:
                self.forward[(s, part.name)] = sum(cost(n)[0] for n in part.nodes)


def _offload_excess(volume: int, stage: int, times: _LayerTimes, bandwidth: float) -> float:
    """Seconds per micro-batch that moving ``volume`` bytes out (during the forward) and back
    (during the backward) does not hide under the stage's compute."""
    transfer = volume / bandwidth
    return max(0.0, transfer - times.stage_forward[stage]) + max(0.0, transfer - times.stage_backward[stage])


def _choose_with_offload(memory: MemoryModel, layers: Sequence[Sequence[str]], stage: int, budget: int,
                         times: _LayerTimes, bandwidth: float) -> tuple[dict[str, LayerAction] | None, StageMemory]:
    """Keep / recompute / offload per layer of one stage, least estimated time first.

    In the spirit of DELTA's *filter* and *director*:

    1. **Filter** - candidates are the stage's layers, largest saved activations first (ties:
       earliest layer first), since each frees the most memory per decision.
    2. **Director** - candidates are taken in that order until the stage fits the budget; each is
       offloaded if the added transfer time (the part of ``offloaded bytes / bandwidth`` that no
       longer hides under the stage's forward, and again under its backward) is at most the
       layer's forward time, else recomputed (recomputation re-runs the forward).
    3. **Fallback** - if every layer is taken and the stage still does not fit, recomputed layers
       become offloaded ones (cheapest first): offload leaves nothing on the device, recompute
       keeps the layer's inputs and re-materializes it before the backward.

    Greedy, not an exact optimum of the step time; per-micro-batch time is what is compared, since
    the same micro-batches (those with a ``RECOMPUTE``) apply whatever is chosen.
    """
    fp = memory.footprints[stage]
    order = sorted(enumerate(fp.layers), key=lambda ip: (-fp.nbytes(ip[1].kept), ip[0]))
    actions: dict[str, LayerAction] = {}

    def estimate() -> StageMemory:
        return memory.stage_memory(_single_stage(layers, stage, actions), stage)

    def offloaded_volume() -> int:
        return sum(_host_bytes(fp, p) for p in fp.layers if actions.get(p.name) is LayerAction.OFFLOAD)

    current = estimate()
    for _, part in order:
        if current.total_bytes <= budget:
            return actions, current
        volume = offloaded_volume()
        extra = (_offload_excess(volume + _host_bytes(fp, part), stage, times, bandwidth)
                 - _offload_excess(volume, stage, times, bandwidth))
        recompute = times.forward[(stage, part.name)]
        actions[part.name] = LayerAction.OFFLOAD if extra <= recompute else LayerAction.RECOMPUTE
        current = estimate()
    recomputed = sorted((n for n, a in actions.items() if a is LayerAction.RECOMPUTE),
                        key=lambda n: -times.forward[(stage, n)])
    for name in recomputed:
        if current.total_bytes <= budget:
            break
        actions[name] = LayerAction.OFFLOAD
        current = estimate()
    if current.total_bytes <= budget:
        return actions, current
    return None, memory.stage_memory(_single_stage(layers, stage, {n: LayerAction.OFFLOAD for n in layers[stage]}), stage)


def _host_bytes(fp: StageFootprint, part: LayerFootprint) -> int:
    return fp.nbytes(part.kept - fp.received)


# ---- errors ------------------------------------------------------------------------------------------------
def _check_fixed(memory: MemoryModel, plan: ActivationPlan, budget: int, mode: str) -> None:
    estimates = memory.estimate(plan)
    over = [(m.stage, m) for m in estimates if m.total_bytes > budget]
    if over:
        raise _budget_error(memory, budget, over, offload=False, mode=mode)


def _budget_error(memory: MemoryModel, budget: int, shortfalls: Sequence[tuple[int, StageMemory]],
                  offload: bool, mode: str = "stage_aware") -> MemoryBudgetError:
    stage, worst = max(shortfalls, key=lambda sm: sm[1].total_bytes)
    need = worst.total_bytes
    layout = memory.layout
    where = (f"pipeline rank {stage} (its {memory.num_chunks} model chunks: virtual stages "
             f"{', '.join(map(str, memory.stages_of(stage)))})" if memory.per_chunk else f"stage {stage}")
    if mode != "stage_aware":
        how = f"with recompute={mode!r}"
    elif offload:
        how = "with every layer offloaded to host memory"
    else:
        how = f"with all {len(worst.layers)} of its layers recomputed"
    fixes = ["more pipeline stages (pp) or tensor parallelism (tp), which split parameters and activations",
             "a smaller micro-batch (per_device_train_batch_size) or shorter sequences"]
    if layout.zero_stage == 0 and layout.dp > 1:
        fixes.insert(1, "ZeRO-1 (zero_stage=1), which shards optimizer states over the dp replicas")
    if mode != "stage_aware":
        fixes.insert(0, "recompute='stage_aware', which recomputes layers until each stage fits")
    elif not offload and not memory.per_chunk:  # offload is not planned per chunk yet
        fixes.append("activation offload to host memory (activation_offload=True)")
    message = (
        f"memory budget of {format_bytes(budget)} ({budget} bytes) per device cannot be met: {where} needs "
        f"at least {format_bytes(need)} {how} (parameters {format_bytes(worst.params_bytes)}, gradients "
        f"{format_bytes(worst.grads_bytes)}, optimizer states {format_bytes(worst.optimizer_bytes)}, activations "
        f"{format_bytes(worst.activation_bytes)} with {worst.peak_inflight} micro-batches in flight, workspace "
        f"{format_bytes(worst.workspace_bytes)}; {layout.describe()}). The smallest budget that fits is "
        f"{format_bytes(need)} ({need} bytes). To fit {format_bytes(budget)}: " + "; or ".join(fixes) + "."
    )
    return MemoryBudgetError(message, need, stage)

