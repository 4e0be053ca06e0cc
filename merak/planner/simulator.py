"""Cluster-scale prediction: step time, memory per device and MFU of a training layout.

Why: choosing dp x tp x pp, the micro-batch, the schedule and the recomputation for 64 GPUs by
trial costs GPU-days. Here the choice is priced from the same pieces that train the model:

1. the **real partitioner** traces the model on meta once (:class:`TracedModel`) and cuts it
   with the hardware's per-node costs (:class:`~merak.planner.cost.RankCostModel`, TP
   sharding and TP all-reduces with sub-micro-batch overlap included);
2. the **real schedules** (:func:`merak.runtime.pipeline.schedule.build_all`) and the **real
   discrete-event simulator** (:func:`merak.runtime.pipeline.simulate.simulate`) give the pipeline time
   from per-stage F, B, W, R and p2p costs (p2p over NVLink or the inter-node link depending
   on where the neighbouring stages' ranks sit, rank order tp -> dp -> pp as in
   :mod:`merak.runtime.distributed.grid`);
3. after each stage's last backward: the tied-embedding all-reduce, the DP gradient all-reduce
   (overlapped with that last backward where the runtime does so) and the optimizer step
   (memory-bound), then the slowest stage decides the step;
4. memory per device from :mod:`merak.planner.memory`; ``stage_aware`` recomputation
   picks, per stage, the smallest recomputed fraction that fits the device (Merak's
   stage-aware recomputation under a memory budget).

MFU counts model FLOPs only (forward FLOPs of the traced graph x 3, attention included,
recomputation excluded) over ``step time x devices x peak``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from merak.partitioner.configs import build_model, default_seq_len, example_inputs, load_config
from merak.partitioner.proxy_graph import ProxyGraph, trace
from merak.partitioner.sharding import PartitionPlan, shard
from merak.planner.cluster import Cluster
from merak.planner.cost import NodeTimes, RankCostModel, op_kinds, tp_boundary_extras, tp_layer_factors
from merak.planner.memory import (Precision, StageMemory, attention_core_nodes, holder_profile,
                                          stage_footprints, stage_memory)
from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.pipeline.placement import PlacedSchedule
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.schedule import SCHEDULES, VIRTUAL_SCHEDULES, build_all
from merak.runtime.pipeline.schedule import check_sizes as check_schedule_sizes
from merak.runtime.pipeline.simulate import Costs, SimulationResult, simulate

__all__ = ["TracedModel", "Strategy", "Prediction", "StageCosts", "StepPlan", "RECOMPUTE_CHOICES", "lower_bound",
           "plan_step", "predict", "simulate_pipeline"]

#: Recomputation choices of a strategy: none; every layer (``full``); Megatron's attention-core
#: recomputation (``selective``); per stage the fewest layers that fit the device (``stage_aware``).
RECOMPUTE_CHOICES = ("none", "full", "selective", "stage_aware")


# ---- the model ----------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class TracedModel:
    """A model traced once on meta at ``trace_batch`` sequences of ``seq_len`` tokens; TP plans
    and partitions of it are cached here (they are reused by every layout of a search)."""

    label: str
    graph: ProxyGraph
    seq_len: int
    trace_batch: int = 1
    _tp_plans: dict[tuple[int, str], Any] = dataclasses.field(default_factory=dict, repr=False)
    _shards: dict[Any, PartitionPlan] = dataclasses.field(default_factory=dict, repr=False)
    _cores: frozenset[str] | None = dataclasses.field(default=None, repr=False)
    _kinds: dict[str, str] | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_config(cls, spec: Sequence[str] | str, seq_len: int | None = None, label: str | None = None,
                    attn_implementation: str = "sdpa") -> "TracedModel":
        """``spec``: a model_type (or config.json path) and ``key=value`` overrides, as in
        ``python -m merak.partitioner --config``."""
        parts = spec.split() if isinstance(spec, str) else list(spec)
        config = load_config(parts)
        model = build_model(config, attn_implementation)
        seq = seq_len or default_seq_len(config)
        graph = trace(model, example_inputs(model, 1, seq))
        return cls(label or " ".join(parts), graph, seq)

    @property
    def parameters(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(self.graph.param_numel.values())

    @property
    def layers(self) -> int:
        return len(self.graph.layers)

    @property
    def forward_flops_per_sequence(self) -> float:
        return self.graph.total_flops / self.trace_batch

    @property
    def attention_cores(self) -> frozenset[str]:
        """Nodes of the attention cores (what ``selective`` recomputation recomputes)."""
        if self._cores is None:
            self._cores = attention_core_nodes(self.graph)
        return self._cores

    @property
    def op_kinds(self) -> dict[str, str]:
        """Node name -> op class (for devices calibrated per op class)."""
        if self._kinds is None:
            self._kinds = op_kinds(self.graph)
        return self._kinds

    def tp_plan(self, tp: int, moe: str = "tensor") -> Any:
        """The automatic TP plan for ``tp`` ranks with mixture-of-experts banks sharded by ``moe``
        (``None`` for tp=1); raises TPError naming the sizes that ``tp`` does not divide."""
        if tp <= 1:
            return None
        if (tp, moe) not in self._tp_plans:
            from merak.runtime.tensor_parallel.plan import plan_tensor_parallel

            self._tp_plans[tp, moe] = plan_tensor_parallel(self.graph, tp, moe=moe)
        return self._tp_plans[tp, moe]

    def valid_tp(self, limit: int) -> list[int]:
        """tp degrees up to ``limit`` the TP planner accepts for this model."""
        out = [1]
        from merak.runtime.tensor_parallel.experts import MOE_MODES

        for tp in range(2, limit + 1):
            for moe in MOE_MODES:  # valid if some way of sharding the MoE banks (if any) works
                try:
                    self.tp_plan(tp, moe)
                    out.append(tp)
                    break
                except ValueError:
                    continue
        return out


# ---- a layout and what it predicts ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Strategy:
    """How one training job runs: layout, micro-batch, schedule, recomputation and the runtime's
    habits. ``dp_overlap``: the DP all-reduce runs during the step's last backward (Merak's
    runtime, DDP); ``recompute_granularity``: ``stage`` (Merak's runtime re-materializes a stage's
    recomputed part at once) or ``layer`` (per-layer checkpointing, DeepSpeed / Megatron)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    micro_batch: int = 1
    schedule: str = "1f1b"
    recompute: str = "none"
    tp_sub_microbatches: int = 1
    partition: str = "cost"
    dp_overlap: bool = True
    zero1: bool = False
    recompute_granularity: str = "stage"
    precision: Precision = Precision()
    moe: str = "tensor"  # MerakArguments.moe_parallel: how tp shards mixture-of-experts banks

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp

    def label(self) -> str:
        k = f" k={self.tp_sub_microbatches}" if self.tp_sub_microbatches > 1 else ""
        moe = " moe=expert" if self.moe != "tensor" and self.tp > 1 else ""
        return (f"dp{self.dp} tp{self.tp} pp{self.pp} b{self.micro_batch} {self.schedule} "
                f"{self.recompute}{k}{moe}")

    def check(self, cluster: Cluster, global_batch: int) -> int:
        """Validate against the cluster and batch; returns the number of micro-batches M."""
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.recompute not in RECOMPUTE_CHOICES:
            raise ValueError(f"unknown recompute {self.recompute!r}; choose one of {RECOMPUTE_CHOICES}")
        if min(self.dp, self.tp, self.pp, self.micro_batch, self.tp_sub_microbatches) < 1:
            raise ValueError(f"{self.label()}: degrees, micro-batch and tp_sub_microbatches must be >= 1")
        if self.devices != cluster.num_devices:
            raise ValueError(f"dp*tp*pp = {self.dp}*{self.tp}*{self.pp} = {self.devices}, but the cluster has "
                             f"{cluster.num_devices} devices; choose degrees whose product is {cluster.num_devices}")
        if self.tp > cluster.gpus_per_node:
            raise ValueError(f"tp={self.tp} spans nodes ({cluster.gpus_per_node} GPUs per node); keep tp <= "
                             f"{cluster.gpus_per_node} so TP all-reduces stay on NVLink")
        if self.micro_batch % self.tp_sub_microbatches:
            raise ValueError(f"tp_sub_microbatches={self.tp_sub_microbatches} must divide the micro-batch "
                             f"{self.micro_batch}")
        if global_batch % (self.dp * self.micro_batch):
            raise ValueError(f"global batch {global_batch} is not a multiple of dp x micro-batch = "
                             f"{self.dp} x {self.micro_batch}")
        m = global_batch // (self.dp * self.micro_batch)
        if self.schedule in VIRTUAL_SCHEDULES and self.pp == 1:
            raise ValueError(f"{self.schedule} with pp=1 is one rank running its chunks in turn; use 1f1b")
        check_schedule_sizes(self.schedule, self.pp, m)
        return m


@dataclasses.dataclass(frozen=True)
class StageCosts:
    """Per stage, seconds per micro-batch: forward, input gradient, weight gradient, recompute of
    the whole recomputable part (the simulator scales it by the plan's fraction), p2p."""

    forward: tuple[float, ...]
    backward_input: tuple[float, ...]
    backward_weight: tuple[float, ...]
    recompute: tuple[float, ...]
    p2p: tuple[float, ...]

    def costs(self) -> Costs:
        return Costs(self.forward, self.backward_input, self.backward_weight, self.recompute, self.p2p)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What a strategy costs on a cluster (seconds, bytes); ``fits`` is False when a stage's
    memory exceeds the device's usable memory (the numbers are then what it *would* take)."""

    strategy: Strategy
    microbatches: int
    step_seconds: float
    pipeline_seconds: float
    dp_exposed_seconds: float
    tied_seconds: float
    optimizer_seconds: float
    bubble_ratio: float
    mfu: float
    samples_per_second: float
    tokens_per_second: float
    memory: tuple[StageMemory, ...]
    usable_bytes: float
    stage_costs: StageCosts
    recompute_fractions: tuple[float, ...]
    imbalance: float

    @property
    def peak_memory_bytes(self) -> float:
        return max(m.total_bytes for m in self.memory)

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.usable_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": dataclasses.asdict(self.strategy), "microbatches": self.microbatches,
            "step_seconds": self.step_seconds, "pipeline_seconds": self.pipeline_seconds,
            "dp_exposed_seconds": self.dp_exposed_seconds, "tied_seconds": self.tied_seconds,
            "optimizer_seconds": self.optimizer_seconds, "bubble_ratio": self.bubble_ratio, "mfu": self.mfu,
            "samples_per_second": self.samples_per_second, "tokens_per_second": self.tokens_per_second,
            "fits": self.fits, "peak_memory_bytes": self.peak_memory_bytes, "usable_bytes": self.usable_bytes,
            "stages": [m.to_json() for m in self.memory],
            "recompute_fractions": list(self.recompute_fractions), "imbalance": self.imbalance,
        }


# ---- pipeline ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Schedule:
    """A built schedule and the per-stage counts memory needs (computed once per schedule)."""

    ops: tuple[tuple[Instruction, ...], ...]
    #: per stage, :func:`~merak.planner.memory.holder_profile` of its list
    holders: tuple[np.ndarray, ...]


@functools.lru_cache(maxsize=512)
def _schedule(name: str, p: int, m: int, plan: RecomputePlan) -> _Schedule:
    built = build_all(name, p, m, plan)
    chunks = built.placement.num_chunks
    # Keeps its placement: virtual-stage schedules route (and are simulated) by it.
    ops = PlacedSchedule([tuple(stage) for stage in built], built.placement)
    return _Schedule(ops, tuple(holder_profile(o, num_chunks=chunks) for o in ops))


@functools.lru_cache(maxsize=128)
def _all_recomputed_holders(name: str, p: int, m: int) -> tuple[np.ndarray, ...]:
    """Per stage, the holders of the schedule without recomputation as if every micro-batch
    were recomputed (pricing a plan before building its schedule)."""
    everything = frozenset(range(m))
    ops = _schedule(name, p, m, RecomputePlan.none(p)).ops
    return tuple(holder_profile(o, everything, ops.placement.num_chunks) for o in ops)


def simulate_pipeline(schedule: str, num_stages: int, num_microbatches: int, costs: StageCosts | Costs,
                      recompute_plan: RecomputePlan | None = None) -> SimulationResult:
    """One step of ``schedule`` under per-stage ``costs`` (the real schedule and simulator)."""
    plan = recompute_plan or RecomputePlan.none(num_stages)
    ops = _schedule(schedule, num_stages, num_microbatches, plan).ops
    return simulate(ops, costs.costs() if isinstance(costs, StageCosts) else costs, plan)


# ---- prediction ----------------------------------------------------------------------------------------

def _rank(strategy: Strategy, pp: int, dp: int, tp: int) -> int:
    return (pp * strategy.dp + dp) * strategy.tp + tp


def _pipeline_link(strategy: Strategy, cluster: Cluster) -> Any:
    """The slowest link between ranks of neighbouring stages (what the partitioner prices cuts at)."""
    crosses = any(cluster.node_of(_rank(strategy, s, d, t)) != cluster.node_of(_rank(strategy, s + 1, d, t))
                  for s in range(strategy.pp - 1) for d in range(strategy.dp) for t in range(strategy.tp))
    return cluster.inter if crosses else cluster.intra


def _cost_model(model: TracedModel, strategy: Strategy, cluster: Cluster) -> RankCostModel:
    tp_plan = model.tp_plan(strategy.tp, strategy.moe)
    base = RankCostModel(cluster.device, batch_scale=strategy.micro_batch / model.trace_batch,
                         byte_scale=strategy.precision.byte_scale, tp=strategy.tp, tp_plan=tp_plan,
                         link_bytes_per_s=_pipeline_link(strategy, cluster).bytes_per_s, op_kinds=model.op_kinds)
    if strategy.tp <= 1:
        return base
    factors = tp_layer_factors(model.graph, base, strategy.tp_sub_microbatches, cluster.intra)
    extras = tp_boundary_extras(model.graph, base, cluster.intra)
    return dataclasses.replace(base, layer_factors={layer: factors for layer in model.graph.layers}, extras=extras)


def _partition(model: TracedModel, strategy: Strategy, cluster: Cluster) -> tuple[PartitionPlan, RankCostModel]:
    """The partition and its cost model (schedule and recomputation do not change either)."""
    return _partition_cached(model, dataclasses.replace(strategy, schedule="1f1b", recompute="none"), cluster)


@functools.lru_cache(maxsize=256)
def _partition_cached(model: TracedModel, strategy: Strategy, cluster: Cluster) -> tuple[PartitionPlan, RankCostModel]:
    """Where the cuts fall is decided once per (pp, tp, sub-micro-batches, method, link) at the
    smallest micro-batch that allows the sub-micro-batches (costs grow in proportion with the
    batch, so the balance hardly depends on it; the ``cost`` sharder is the expensive step of a
    search) and reused, with every stage's costs and statistics recomputed at the strategy's
    own micro-batch."""
    cost_model = _cost_model(model, strategy, cluster)
    link = _pipeline_link(strategy, cluster)
    cut_key = (strategy.pp, strategy.partition, strategy.tp, strategy.tp_sub_microbatches,
               strategy.precision.activation_bytes, cluster.device, cluster.intra, link)
    if cut_key not in model._shards:
        reference = dataclasses.replace(strategy, micro_batch=strategy.tp_sub_microbatches)
        model._shards[cut_key] = shard(model.graph, strategy.pp, method=strategy.partition,
                                       cost_model=_cost_model(model, reference, cluster))
    cuts = model._shards[cut_key]
    if strategy.pp == 1:
        return shard(model.graph, 1, cost_model=cost_model), cost_model
    starts = [s.first_node for s in cuts.stages[1:]]
    plan = shard(model.graph, strategy.pp, method="manual", manual_cuts=starts, cost_model=cost_model)
    plan.method = strategy.partition
    return plan, cost_model


def _stage_costs(plan: PartitionPlan, cost_model: RankCostModel, strategy: Strategy, cluster: Cluster,
                 batch_scale: float, cores: frozenset[str]) -> StageCosts:
    """Per-stage costs; ``recompute`` is the forward of the stage's layers, or only of their
    attention core for ``selective``. A stage's p2p time is its slower link: forward to s+1
    (cut after s) or backward to s-1 (cut before s), each over NVLink or the inter-node link."""
    fwd, bi, bw, rec = [], [], [], []
    for s in range(plan.num_stages):
        times: list[tuple[Any, NodeTimes]] = [(n, cost_model.node_times(n)) for n in plan.stage_nodes(s)]
        fwd.append(sum(t.forward for _, t in times))
        bi.append(sum(t.backward_input for _, t in times))
        bw.append(sum(t.backward_weight for _, t in times))
        if strategy.recompute == "selective":
            rec.append(sum(t.forward for n, t in times if n.name in cores))
        else:
            rec.append(sum(t.forward for n, t in times if n.layer is not None))
    scale = batch_scale * strategy.precision.byte_scale
    p2p = []
    for s in range(plan.num_stages):
        worst = 0.0
        for peer, cut in ((s + 1, s), (s - 1, s - 1)):  # forward to s+1 over cut s; backward to s-1 over cut s-1
            if 0 <= peer < plan.num_stages:
                nbytes = plan.stages[cut].send_bytes * scale
                worst = max(worst, max(cluster.p2p_seconds(nbytes, _rank(strategy, s, d, t), _rank(strategy, peer, d, t))
                                       for d in range(strategy.dp) for t in range(strategy.tp)))
        p2p.append(worst)
    return StageCosts(tuple(fwd), tuple(bi), tuple(bw), tuple(rec), tuple(p2p))


def _stage_memory(fp: Any, strategy: Strategy, fraction: float, holders: np.ndarray,
                  batch_scale: float) -> StageMemory:
    mode = "selective" if strategy.recompute == "selective" else strategy.recompute_granularity
    return stage_memory(fp, fraction=fraction, holders=holders, batch_scale=batch_scale,
                        precision=strategy.precision, mode=mode, dp=strategy.dp, zero1=strategy.zero1)


def _memory(footprints: Sequence[Any], schedule: _Schedule, fractions: Sequence[float], strategy: Strategy,
            batch_scale: float) -> list[StageMemory]:
    return [_stage_memory(fp, strategy, f, holders, batch_scale)
            for fp, f, holders in zip(footprints, fractions, schedule.holders)]


def _fit_fractions(footprints: Sequence[Any], strategy: Strategy, m: int, batch_scale: float,
                   usable: float) -> RecomputePlan:
    """Stage-aware recomputation under the device budget: per stage the smallest fraction (in
    steps of one layer) whose peak fits. First priced on the schedule without recomputation as
    if every micro-batch were recomputed (1F1B's peak under that plan, which the shifted
    schedule does not exceed), then re-checked on the schedule built with the plan (whose kept
    cool-down micro-batches depend on it), one more layer where a stage still does not fit."""
    p = strategy.pp
    steps = [max(fp.layers, 1) for fp in footprints]
    holders = _all_recomputed_holders(strategy.schedule, p, m)

    def fits(s: int, level: int) -> bool:
        mem = _stage_memory(footprints[s], strategy, level / steps[s], holders[s], batch_scale)
        return mem.total_bytes <= usable

    level = []
    for s in range(p):  # memory falls as the fraction grows: bisect the smallest level that fits
        lo, hi = 0, steps[s]
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(s, mid) else (mid + 1, hi)
        level.append(lo)
    for _ in range(sum(steps) + 1):
        fractions = tuple(level[s] / steps[s] for s in range(p))
        plan = RecomputePlan(fractions)
        memory = _memory(footprints, _schedule(strategy.schedule, p, m, plan), fractions, strategy, batch_scale)
        over = [s for s in range(p) if memory[s].total_bytes > usable and level[s] < steps[s]]
        if not over:
            return plan
        for s in over:
            level[s] += 1
    return RecomputePlan(tuple(level[s] / steps[s] for s in range(p)))


def _recompute_plan(strategy: Strategy, footprints: Sequence[Any], m: int, batch_scale: float,
                    usable: float) -> RecomputePlan:
    if strategy.recompute == "none":
        return RecomputePlan.none(strategy.pp)
    if strategy.recompute in ("full", "selective"):
        return RecomputePlan.full(strategy.pp)
    return _fit_fractions(footprints, strategy, m, batch_scale, usable)


def _last_backward(ops: Sequence[Instruction], costs: StageCosts, s: int) -> float:
    """How long the DP all-reduce can hide under: the stage's final op if it is a full backward
    (gradient hooks fire during it); deferred weight passes give no hook to overlap with."""
    compute = [i for i in ops if i.op in (Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT)]
    if compute and compute[-1].op is Op.BACKWARD:
        return costs.backward_input[s] + costs.backward_weight[s]
    return 0.0


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Everything about a strategy except its timing: the partition, per-stage costs, the
    recompute plan, the schedule and the memory per device (cheap next to the simulation, so a
    search rejects what does not fit, or cannot win, before simulating it)."""

    strategy: Strategy
    microbatches: int
    partition: PartitionPlan
    costs: StageCosts
    footprints: tuple[Any, ...]
    recompute_plan: RecomputePlan
    schedule: tuple[tuple[Instruction, ...], ...]
    memory: tuple[StageMemory, ...]
    usable_bytes: float

    @property
    def fits(self) -> bool:
        return max(m.total_bytes for m in self.memory) <= self.usable_bytes

    @property
    def busy_lower_bound(self) -> float:
        """No step is shorter than the busiest stage's compute (recomputation included)."""
        c, f = self.costs, self.recompute_plan.fractions
        return self.microbatches * max(c.forward[s] + c.backward_input[s] + c.backward_weight[s] + f[s] * c.recompute[s]
                                       for s in range(len(f)))


def lower_bound(model: TracedModel, strategy: Strategy, global_batch: int, cluster: Cluster) -> float:
    """A cheap lower bound on the step time: M x the busiest stage's compute without
    recomputation (needs the partition, not the schedule)."""
    m = strategy.check(cluster, global_batch)
    plan, cost_model = _partition(model, strategy, cluster)
    c = _stage_costs(plan, cost_model, strategy, cluster, strategy.micro_batch / model.trace_batch,
                     model.attention_cores)
    return m * max(f + b + w for f, b, w in zip(c.forward, c.backward_input, c.backward_weight))


def plan_step(model: TracedModel, strategy: Strategy, global_batch: int, cluster: Cluster) -> StepPlan:
    """Partition, costs, recompute plan, schedule and memory of ``strategy`` (see :func:`predict`)."""
    m = strategy.check(cluster, global_batch)
    plan, cost_model = _partition(model, strategy, cluster)
    batch_scale = strategy.micro_batch / model.trace_batch
    costs = _stage_costs(plan, cost_model, strategy, cluster, batch_scale, model.attention_cores)
    footprints = tuple(stage_footprints(plan, strategy.precision, model.tp_plan(strategy.tp, strategy.moe), model.attention_cores))
    usable = cluster.device.usable_bytes
    rplan = _recompute_plan(strategy, footprints, m, batch_scale, usable)
    schedule = _schedule(strategy.schedule, strategy.pp, m, rplan)
    memory = tuple(_memory(footprints, schedule, rplan.fractions, strategy, batch_scale))
    return StepPlan(strategy, m, plan, costs, footprints, rplan, schedule.ops, memory, usable)


def predict(model: TracedModel, strategy: Strategy, global_batch: int, cluster: Cluster,
            step_plan: StepPlan | None = None) -> Prediction:
    """Predicted step time, memory per device and MFU of ``strategy`` training ``model`` with
    ``global_batch`` sequences per step on ``cluster`` (see the module docstring). Pass the
    :func:`plan_step` result if it was already computed."""
    sp = step_plan or plan_step(model, strategy, global_batch, cluster)
    costs, footprints, schedule, rplan = sp.costs, sp.footprints, sp.schedule, sp.recompute_plan
    sim = simulate(schedule, costs.costs(), rplan)

    device = cluster.device
    ends, optimizer = [], []
    dp_exposed = 0.0
    for s in range(strategy.pp):
        grads = footprints[s].params * strategy.precision.grad_bytes
        group = [_rank(strategy, s, d, 0) for d in range(strategy.dp)]
        reduce = cluster.allreduce_seconds(grads, group)
        window = _last_backward(schedule[s], costs, s) if strategy.dp_overlap else 0.0
        exposed = max(reduce - window, 0.0)
        dp_exposed = max(dp_exposed, exposed)
        end = max((iv.end for iv in sim.busy[s]), default=0.0)
        ends.append(end + exposed)
        shard_params = footprints[s].params / (strategy.dp if strategy.zero1 else 1)
        # Adam over fp32 master weights: read weight, grad, 2 moments; write weight, 2 moments (+ a
        # 16-bit copy where weights are 16-bit) - about 32 bytes per parameter, memory-bound.
        opt = device.memory_seconds(shard_params * 32)
        if strategy.zero1:
            opt += cluster.allgather_seconds(footprints[s].params * strategy.precision.weight_bytes, group)
        optimizer.append(opt)
    tied = 0.0
    if strategy.pp > 1:
        tied_numel = sum(model.graph.param_numel[p] for p in sp.partition.tied_stages())
        share = 1.0 / strategy.tp if strategy.tp > 1 else 1.0  # vocab-parallel: each rank its rows
        tied = cluster.allreduce_seconds(tied_numel * share * strategy.precision.grad_bytes,
                                         [_rank(strategy, 0, 0, 0), _rank(strategy, strategy.pp - 1, 0, 0)])
    step = max(ends) + tied + max(optimizer)
    samples = global_batch / step
    model_flops = 3.0 * model.forward_flops_per_sequence * global_batch
    return Prediction(
        strategy=strategy, microbatches=sp.microbatches, step_seconds=step, pipeline_seconds=sim.makespan,
        dp_exposed_seconds=dp_exposed, tied_seconds=tied, optimizer_seconds=max(optimizer),
        bubble_ratio=sim.bubble_ratio, mfu=model_flops / (step * cluster.num_devices * device.peak_flops),
        samples_per_second=samples, tokens_per_second=samples * model.seq_len, memory=sp.memory,
        usable_bytes=sp.usable_bytes, stage_costs=costs, recompute_fractions=rplan.fractions,
        imbalance=sp.partition.imbalance,
    )
