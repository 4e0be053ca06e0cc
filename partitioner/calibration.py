"""Stage-level calibration: time the stages a plan produces and re-cut until they balance.

Why: a plan is balanced on *predicted* stage costs, each the sum of its nodes' costs. Even
measured node costs (:mod:`merak.partitioner.profiler`) do not add up to what a stage takes:
running nodes together adds the autograd engine's work between them, gradient accumulation
for values used twice (residuals), cache effects and the stage's own glue, and millisecond
node timings are noisy. On this project's CPU benchmark (GPT-2, 2 stages) a FLOP-balanced cut
left stage 0 6 % slower than stage 1 when the two stages were timed, and a 1F1B pipeline
runs at the pace of its slowest stage. So measure what matters: build every stage of the plan
(the generated stage module, one micro-batch, forward and backward, exactly what the executor
runs), compare with the prediction and correct the node costs stage by stage — every node of
stage ``s`` is scaled by ``measured_s / predicted_s``, separately for forward and backward —
then cut again. The scaled costs keep the within-stage shape of the base model, so the new
cut lands where the corrected costs balance. A few rounds converge; the plan with the
smallest *measured* imbalance is kept, so calibration never returns a plan it measured to be
worse balanced than the one it started from.

Cost: every round runs each stage ``repeats + 1`` times, i.e. about ``repeats + 1`` training
steps of one micro-batch on one device. Every rank measures every stage (one at a time, so a
rank holds one stage's weights and one micro-batch of boundary values); a model whose weights
are on the meta device gets each stage materialized in turn with random initial values, which
time like the real ones. Measurements are averaged over the ranks before any decision, so all
ranks keep the same plan.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .cost_model import CostModel, NodeCost
from .profiler import DeviceTimer, example_on_device, mean_over_ranks
from .proxy_graph import ProxyNode
from .sharding import PartitionPlan, shard
from .stage import StageModule, build_stage

__all__ = ["CalibratedCostModel", "Calibration", "CalibrationRound", "calibrate", "time_stages"]

LossFn = Callable[[Mapping[str, Any], Mapping[str, Any]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class CalibratedCostModel(CostModel):
    """``base``'s node costs multiplied by per-node factors learnt from stage timings."""

    base: CostModel
    forward_scale: Mapping[str, float]
    backward_scale: Mapping[str, float]
    rounds: int = 0

    name = "calibrated"

    def node_cost(self, node: ProxyNode) -> NodeCost:
        cost = self.base.node_cost(node)
        return NodeCost(cost.forward * self.forward_scale.get(node.name, 1.0),
                        cost.backward * self.backward_scale.get(node.name, 1.0))

    def transfer_cost(self, nbytes: int) -> float:
        return self.base.transfer_cost(nbytes)

    def describe(self) -> str:
        return f"{self.base.describe()}, calibrated by {self.rounds} round(s) of stage timings"

    def corrected(self, plan: PartitionPlan, measured: Sequence[NodeCost]) -> "CalibratedCostModel":
        """These costs with every node of stage ``s`` rescaled so stage ``s`` predicts ``measured[s]``."""
        forward, backward = dict(self.forward_scale), dict(self.backward_scale)
        for s, actual in enumerate(measured):
            nodes = plan.stage_nodes(s)
            predicted = [self.node_cost(n) for n in nodes]
            f_ratio = _ratio(actual.forward, sum(c.forward for c in predicted))
            b_ratio = _ratio(actual.backward, sum(c.backward for c in predicted))
            for n in nodes:
                forward[n.name] = forward.get(n.name, 1.0) * f_ratio
                backward[n.name] = backward.get(n.name, 1.0) * b_ratio
        return dataclasses.replace(self, forward_scale=forward, backward_scale=backward, rounds=self.rounds + 1)


def _ratio(actual: float, predicted: float) -> float:
    return actual / predicted if predicted > 0 and actual > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class CalibrationRound:
    """One measured plan: where its stages start and what each took (seconds per micro-batch)."""

    bounds: tuple[int, ...]
    first_nodes: tuple[str, ...]
    measured: tuple[NodeCost, ...]

    @property
    def slowest(self) -> float:
        return max(c.total for c in self.measured)

    @property
    def imbalance(self) -> float:
        mean = sum(c.total for c in self.measured) / len(self.measured)
        return self.slowest / mean if mean > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The calibrated plan and the rounds that led to it (``rounds[0]`` is the starting plan)."""

    plan: PartitionPlan
    rounds: tuple[CalibrationRound, ...]
    chosen: int

    @property
    def speedup(self) -> float:
        """How much faster the kept plan's pipeline should run than the starting plan's: the ratio
        of their imbalances (each measured within one round, so a machine's drift between
        rounds cancels; the total work barely depends on the cut)."""
        return self.rounds[0].imbalance / self.rounds[self.chosen].imbalance

    def table(self) -> str:
        """One row per round: where stages 1.. start, the measured ms per stage, the imbalance."""
        lines = [f"partition calibration: {len(self.rounds)} measured plan(s), kept round {self.chosen} "
                 f"(imbalance {self.rounds[self.chosen].imbalance:.3f}, slowest stage "
                 f"{1e3 * self.rounds[self.chosen].slowest:.1f} ms per micro-batch; about {self.speedup:.3f}x "
                 f"the starting plan's speed)",
                 "round  stage starts (stages 1..)                    fwd+bwd ms per stage          imbalance"]
        for i, r in enumerate(self.rounds):
            starts = ", ".join(r.first_nodes[1:]) or "-"
            times = " ".join(f"{1e3 * c.forward:.1f}+{1e3 * c.backward:.1f}" for c in r.measured)
            mark = " *" if i == self.chosen else ""
            lines.append(f"{i:>5}  {starts[:44]:<44} {times:<29} {r.imbalance:.3f}{mark}")
        return "\n".join(lines)


def time_stages(
    plan: PartitionPlan,
    example_inputs: Mapping[str, Any],
    *,
    device: torch.device | str | None = None,
    repeats: int = 5,
    loss_fn: LossFn | None = None,
    seed: int = 1234,
) -> list[NodeCost]:
    """Median forward and backward seconds of every stage of ``plan`` on one micro-batch.

    Each stage is fed the previous stage's outputs, as the pipeline feeds them. Backward starts
    from the loss on the last stage (``loss_fn``, or the model's ``loss`` output) and from
    all-ones gradients of the sent values elsewhere. The model's gradients are left as ``None``.

    A model with real weights has all its stages built at once (they share its parameters, so
    that costs no memory) and timed in turns - stage 0, 1, ..., 0, 1, ... - so a slow spell of
    the machine lands on every stage alike. A meta model has each stage materialized in turn
    and timed ``repeats`` times before the next is built, holding one stage's weights at a time.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev, data = example_on_device(example_inputs, device, "time_stages")
    timer = DeviceTimer(dev)
    home = _parameter_device(plan)
    probes: list[_StageProbe] = []
    received: dict[str, Any] = {}
    samples: list[list[tuple[float, float]]] = []
    try:
        for stage_id in range(plan.num_stages):
            probe = _StageProbe(build_stage(plan, stage_id, device=dev, seed=seed), data, received, loss_fn)
            received = probe.warm_up(timer)  # also what the next stage receives
            if home is None:  # meta weights: time now, then let this stage go
                samples.append([probe.once(timer) for _ in range(repeats)])
                probe.release(home, dev)
            else:
                probes.append(probe)
        if probes:
            samples = [[] for _ in probes]
            for _ in range(repeats):
                for probe, mine in zip(probes, samples):
                    mine.append(probe.once(timer))
    finally:
        for probe in probes:
            probe.release(home, dev)
    return [NodeCost(statistics.median(f for f, _ in mine), statistics.median(b for _, b in mine))
            for mine in samples]


def _parameter_device(plan: PartitionPlan) -> torch.device | None:
    """Where a real-weight model's parameters live; ``None`` for a meta model."""
    param = next(plan.graph.model.parameters(), None)
    if param is None:
        return torch.device("cpu")
    return None if param.device.type == "meta" else param.device


def _as_received(value: Any) -> Any:
    """What the next stage gets: a detached copy, a leaf requiring grad where it is floating."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().clone().requires_grad_(value.is_floating_point())


class _StageProbe:
    """One stage with its inputs, timed forward then backward."""

    def __init__(self, stage: StageModule, data: Mapping[str, Any], received: Mapping[str, Any],
                 loss_fn: LossFn | None) -> None:
        self.stage, self.data, self.received, self.loss_fn = stage, data, received, loss_fn
        self.inputs = {k: data[k] for k in stage.data_inputs}

    def warm_up(self, timer: DeviceTimer) -> dict[str, Any]:
        """One untimed run (allocator, lazy initialisation); returns what the next stage receives."""
        outputs = self._run(timer)[2]
        return {n: _as_received(outputs[n]) for n in self.stage.send_outputs}

    def once(self, timer: DeviceTimer) -> tuple[float, float]:
        forward, backward, _ = self._run(timer)
        return forward, backward

    def _run(self, timer: DeviceTimer) -> tuple[float, float, dict[str, Any]]:
        received = {k: _as_received(v) for k, v in self.received.items()}
        forward, outputs = timer.time(lambda: self.stage(self.inputs, received))
        roots, grads = _backward_roots(self.stage, outputs, self.data, self.loss_fn)
        backward = timer.time(lambda: torch.autograd.backward(roots, grads))[0] if roots else 0.0
        return forward, backward, outputs

    def release(self, home: torch.device | None, device: torch.device) -> None:
        """Drop the gradients; a real-weight model's shared parameters go back where they were."""
        for p in self.stage.parameters():
            p.grad = None
        if home is not None and home != device:
            self.stage.to(home)


def _backward_roots(stage: StageModule, outputs: Mapping[str, Any], data: Mapping[str, Any],
                    loss_fn: LossFn | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if stage.is_last:
        if loss_fn is not None:
            loss = loss_fn(outputs, data)
            return [loss], [torch.ones_like(loss)]
        if isinstance(outputs.get("loss"), torch.Tensor):
            return [outputs["loss"]], [torch.ones_like(outputs["loss"])]
        values = list(outputs.values())
    else:
        values = [outputs[n] for n in stage.send_outputs]
    roots = [t for t in pytree.tree_leaves(values) if isinstance(t, torch.Tensor) and t.requires_grad]
    return roots, [torch.ones_like(t) for t in roots]


def calibrate(
    plan: PartitionPlan,
    example_inputs: Mapping[str, Any] | None = None,
    *,
    rounds: int = 3,
    repeats: int = 5,
    device: torch.device | str | None = None,
    loss_fn: LossFn | None = None,
    measure: Callable[[PartitionPlan], Sequence[NodeCost]] | None = None,
    group: Any = None,
    timeout_s: float = 300.0,
    tolerance: float = 0.01,
) -> Calibration:
    """Re-cut ``plan`` (a ``method="cost"`` plan) on measured stage times; see the module docstring.

    ``measure(plan)`` returns every stage's seconds per micro-batch, the same on every rank (as
    :func:`merak.runtime.pipeline.calibration.pipeline_stage_times`, which times the stages inside
    the running pipeline, does). By default each stage is timed on its own with
    :func:`time_stages` on ``example_inputs`` by every rank of ``group`` (default: all), and the
    ranks' times are averaged so all keep the same cut. Runs at most ``rounds`` corrections (so
    ``rounds + 1`` measured plans), stopping early when a cut repeats.
    """
    if plan.method != "cost":
        raise ValueError(f"calibration re-balances cost-based plans; this plan was cut with method={plan.method!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if measure is None:
        if example_inputs is None:
            raise ValueError("calibrate needs example_inputs (one micro-batch) to time the stages, or a measure function")

        def each_stage_alone(candidate: PartitionPlan) -> tuple[NodeCost, ...]:
            times = time_stages(candidate, example_inputs, device=device, repeats=repeats, loss_fn=loss_fn)
            return _averaged(times, group, timeout_s)

        measure = each_stage_alone
    model = plan.cost_model if isinstance(plan.cost_model, CalibratedCostModel) else \
        CalibratedCostModel(plan.cost_model, {}, {})
    history: list[CalibrationRound] = []
    plans: list[PartitionPlan] = []
    current = plan
    for round_ in range(rounds + 1):
        measured = tuple(measure(current))
        history.append(CalibrationRound(current.bounds, tuple(s.first_node for s in current.stages), measured))
        plans.append(current)
        if round_ == rounds:
            break
        model = model.corrected(current, measured)
        current = shard(plan.graph, plan.num_stages, cost_model=model, tolerance=tolerance)
        if any(current.bounds == r.bounds for r in history):
            break  # converged (or cycling): the next cut was measured already
    # The most balanced measured plan. Not the one with the smallest slowest stage: rounds are
    # measured one after another, and a machine's speed drifts between them by more than the
    # differences being corrected, while both stages of one round see the same conditions.
    chosen = min(range(len(history)), key=lambda i: (history[i].imbalance, i))
    # Report the kept plan under the latest costs: they describe every measured round best.
    return Calibration(plans[chosen].repriced(model), tuple(history), chosen)


def _averaged(measured: list[NodeCost], group: Any, timeout_s: float) -> tuple[NodeCost, ...]:
    values = torch.tensor([[c.forward, c.backward] for c in measured], dtype=torch.float64)
    values = mean_over_ranks(values, group, timeout_s, "the all-reduce of measured stage times (every rank "
                                                       "must calibrate the partition)")
    return tuple(NodeCost(f, b) for f, b in values.tolist())
