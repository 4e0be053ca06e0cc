"""Device memory per pipeline stage, and ``python -m merak.runtime.memory``.

Why an estimator: whether a layout fits must be known before any rank allocates a byte, and
Merak's stage-aware recomputation needs the same numbers to decide, per stage, how many layers to
recompute (:mod:`merak.runtime.memory.planner`). Per device of stage ``s``:

* **parameters** (fp32 master weights in every precision mode), **gradients** (the same bytes,
  for trainable parameters) and **optimizer states** (Adam/AdamW: two moments plus a 4-byte step
  per tensor; SGD with momentum: one buffer; SGD: none). ZeRO-1 shards optimizer states over the
  DP group the way ``torch.distributed.optim.ZeroRedundancyOptimizer`` does (largest parameters
  first, each to the least-loaded rank; the fullest rank is reported). Tensor-parallel layers
  (from the automatic TP plan) count ``1/tp`` of their sharded weights.
* **activations**: what one micro-batch keeps between its forward and its backward
  (:mod:`merak.runtime.memory.activation_profile`: autograd's saved tensors, measured on meta, per layer
  action), plus the values it received and its outputs (sent values; the logits on the last
  stage: the executor holds both until the backward),
  times the micro-batches the *schedule* has in flight. The stage's instruction list is walked:
  a micro-batch with a ``RECOMPUTE`` keeps its reduced set from its forward to that instruction
  and its materialized set (recomputed layers back, offloaded ones still on the host) to its
  backward; every other micro-batch keeps everything, as the executor does. The peak over the
  list is the activation figure. Tensor-parallel values count ``1/tp`` (an approximation: values
  inside a sharded region are split, the rest replicated, as without sequence parallelism).
* **workspace**: backward transients, estimated as the gradient of the stage's largest value
  (e.g. the logits on the last stage) plus the output gradients it receives.

Not modelled: the CUDA context and allocator fragmentation (leave a few GB of headroom in a
budget), and communication buffers of NCCL. The graph is traced at the micro-batch size and
sequence length the layout trains with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from merak.runtime.memory.activation_profile import PRECISIONS, StageFootprint, stage_footprints
from merak.runtime.memory.policy import ActivationPlan, LayerAction
from merak.planner.cluster import parse_bytes as _parse_size
from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.memory.recompute_plan import RECOMPUTE_MODES, RecomputePlan
from merak.runtime.pipeline.placement import Placement
from merak.runtime.pipeline.schedule import SCHEDULES, build_all, placement_for
from merak.runtime.pipeline.schedules.memory import FREEING_OPS

__all__ = ["OPTIMIZERS", "Layout", "StageMemory", "MemoryModel", "estimate_memory", "parse_bytes",
           "format_bytes", "memory_table", "main"]

#: Optimizers whose states are modelled.
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd_momentum")
_ADAM_STEP_BYTES = 4  # torch.optim.Adam(W) keeps a float32 step counter per parameter tensor


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a model is trained: parallel degrees, batch shape, schedule, optimizer, precision.

    ``micro_batch_size`` must be the batch size the graph was traced with (activations are
    measured at that shape); ``num_microbatches`` is per step and DP replica.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 1
    schedule: str = "1f1b"
    optimizer: str = "adamw"
    precision: str = "fp32"
    zero_stage: int = 0
    #: Model chunks per rank for ``interleaved_1f1b`` (``None``: its default; the other schedules fix it).
    num_chunks: int | None = None

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch_size", "num_microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        choices = {"schedule": SCHEDULES, "optimizer": OPTIMIZERS, "precision": PRECISIONS, "zero_stage": (0, 1)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(map(str, allowed))}")
        placement_for(self.schedule, self.pp, self.num_chunks)  # raises on a chunk count the schedule refuses

    @property
    def placement(self) -> Placement:
        """Which rank holds which model chunk under ``schedule`` (one per rank without virtual stages)."""
        return placement_for(self.schedule, self.pp, self.num_chunks)

    @classmethod
    def from_training_args(cls, args: Any, dp: int, tp: int, pp: int) -> "Layout":
        """The layout of a ``MerakArguments`` run on a ``dp x tp x pp`` grid."""
        optim = str(getattr(args.optim, "value", args.optim))
        if optim.startswith("adamw"):
            optimizer = "adamw"
        elif optim == "sgd":
            optimizer = "sgd"
        else:
            raise ValueError(f"max_memory_per_device: the states of optim={optim!r} are not modelled by the memory "
                             "estimator; use optim='adamw_torch' (or 'sgd'), or drop the budget")
        chunks = getattr(args, "chunks_per_stage", None) if args.schedule == "interleaved_1f1b" else None
        return cls(dp=dp, tp=tp, pp=pp, micro_batch_size=args.per_device_train_batch_size,
                   num_microbatches=args.gradient_accumulation_steps, schedule=args.schedule, optimizer=optimizer,
                   precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
                   zero_stage=getattr(args, "zero_stage", 0), num_chunks=chunks)

    def describe(self) -> str:
        return (f"dp={self.dp} tp={self.tp} pp={self.pp}, {self.schedule}, {self.num_microbatches} micro-batches "
                f"of {self.micro_batch_size}, {self.optimizer}, {self.precision}, ZeRO-{self.zero_stage}")


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Estimated peak bytes on one device of a stage (see the module docstring for each term).

    ``microbatch_bytes`` is what one micro-batch keeps under the plan's actions (before its
    recomputation), ``full_microbatch_bytes`` with every layer kept; ``peak_inflight`` is the most
    micro-batches the schedule has between forward and backward at once; ``host_bytes`` the
    offloaded activations parked in host memory at the peak.
    """

    stage: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    workspace_bytes: int
    peak_inflight: int
    microbatch_bytes: int
    full_microbatch_bytes: int
    layers: tuple[str, ...]
    recomputed_layers: tuple[str, ...] = ()
    selective_layers: tuple[str, ...] = ()
    offloaded_layers: tuple[str, ...] = ()
    host_bytes: int = 0

    @property
    def static_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.static_bytes + self.activation_bytes + self.workspace_bytes

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["total_bytes"] = self.total_bytes
        for key in ("layers", "recomputed_layers", "selective_layers", "offloaded_layers"):
            out[key] = list(out[key])
        return out


# ---- static bytes ------------------------------------------------------------------------------
def _tp_sharded(name: str, tp_plan: Any) -> bool:
    """Whether parameter ``name`` is split over the TP group (column: weight and bias; row:
    weight only, its bias is replicated; vocab: the embedding rows)."""
    if tp_plan is None:
        return False
    module, _, leaf = name.rpartition(".")
    bank = tp_plan.experts.get(module)
    if bank is not None:  # either MoE mode keeps 1/tp of a bank: a slice of each expert, or whole experts
        return leaf in bank.specs
    style = tp_plan.style(module)
    return style == "column" or (style in ("row", "vocab") and leaf == "weight")


def _optimizer_state_bytes(numel: int, element_size: int, optimizer: str) -> int:
    if optimizer in ("adam", "adamw"):
        return 2 * numel * element_size + _ADAM_STEP_BYTES
    if optimizer == "sgd_momentum":
        return numel * element_size
    return 0


def _zero_shard_max(states: Sequence[tuple[int, int]], dp: int) -> int:
    """Largest per-rank optimizer bytes when ``(numel, state bytes)`` parameters are spread over
    ``dp`` ranks as ZeroRedundancyOptimizer does: by numel, largest first, to the least-loaded rank."""
    load = [0] * dp
    state = [0] * dp
    for numel, nbytes in sorted(states, key=lambda s: s[0], reverse=True):
        rank = min(range(dp), key=load.__getitem__)
        load[rank] += numel
        state[rank] += nbytes
    return max(state)


def static_bytes(plan: Any, stage: int | Sequence[int], layout: Layout, tp_plan: Any = None) -> tuple[int, int, int]:
    """``(params, grads, optimizer states)`` bytes on one device of ``stage`` (or of several
    stages on one device: a rank's model chunks, a parameter they share counted once)."""
    model = plan.graph.model
    params = grads = 0
    states: list[tuple[int, int]] = []
    stages = (stage,) if isinstance(stage, int) else tuple(stage)
    for name in dict.fromkeys(n for k in stages for n in plan.stage_parameters(k)):
        p = model.get_parameter(name)
        numel = math.ceil(p.numel() / layout.tp) if layout.tp > 1 and _tp_sharded(name, tp_plan) else p.numel()
        params += numel * p.element_size()
        if p.requires_grad:
            grads += numel * p.element_size()
            states.append((numel, _optimizer_state_bytes(numel, p.element_size(), layout.optimizer)))
    if layout.zero_stage == 1 and layout.dp > 1:
        optimizer = _zero_shard_max(states, layout.dp)
    else:
        optimizer = sum(b for _, b in states)
    return params, grads, optimizer


# ---- activations over a schedule ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _ChunkBytes:
    """What one micro-batch of a chunk (or stage) holds under its layer actions: everything
    (``full``), between forward and ``RECOMPUTE`` (``reduced``), from ``RECOMPUTE`` to its
    backward (``materialized``), parked on the host (``host``), and the largest offloaded layer
    coming back during backward (``returning``)."""

    full: float
    reduced: float
    materialized: float
    host: float
    returning: float

    @classmethod
    def of(cls, fp: StageFootprint, actions: Mapping[str, LayerAction], share: float = 1.0) -> "_ChunkBytes":
        held = fp.outputs  # the executor keeps a micro-batch's outputs until its backward
        offloaded = [fp.nbytes(p.kept - fp.received) for p in fp.layers if actions.get(p.name) is LayerAction.OFFLOAD]
        return cls(full=fp.nbytes(fp.retained({}) | held) * share,
                   reduced=fp.nbytes(fp.retained(actions) | held) * share,
                   materialized=fp.nbytes(fp.retained(actions, materialized=True) | held) * share,
                   host=sum(offloaded) * share,
                   # offloaded tensors come back as backward reaches their layer, one layer at a time
                   returning=max(offloaded, default=0) * share)


def _activation_peak(ops: Sequence[Instruction], chunks: Sequence[_ChunkBytes]) -> tuple[int, int, int]:
    """``(peak activation bytes, peak in-flight micro-batches, peak host bytes)`` of one device
    walking its instruction list, a micro-batch of chunk ``c`` holding ``chunks[c]``.

    With virtual stages in-flight counts ``(chunk, micro-batch)`` pairs; each chunk is priced
    with its own footprint and actions when the partition has one stage per chunk, else (a
    partition into ``P`` stages) as an equal share of its rank's stage, what the simulator
    assumes for time.
    """
    recomputed = {i.key for i in ops if i.op is Op.RECOMPUTE}
    live: dict[tuple[int, int], float] = {}
    parked: dict[tuple[int, int], float] = {}
    peak = peak_host = 0.0
    peak_inflight = 0
    for ins in ops:
        if ins.microbatch is None:
            continue
        key = ins.key
        size = chunks[ins.chunk]
        transient = 0.0
        if ins.op is Op.FORWARD:
            live[key] = size.reduced if key in recomputed else size.full
            parked[key] = size.host if key in recomputed else 0.0
        elif ins.op is Op.RECOMPUTE:
            live[key] = size.materialized
        elif ins.op in (Op.BACKWARD, Op.BACKWARD_INPUT) and key in recomputed:
            transient = size.returning
        peak = max(peak, sum(live.values()) + transient)
        peak_inflight = max(peak_inflight, len(live))
        peak_host = max(peak_host, sum(parked.values()))
        if ins.op in FREEING_OPS:
            live.pop(key, None)
            parked.pop(key, None)
    return int(round(peak)), peak_inflight, int(round(peak_host))


def _workspace(fp: StageFootprint, plan: Any, stage: int) -> int:
    largest = max((fp.nbytes(fp.profile.value_keys(n.name, stage)) for n in plan.stage_nodes(stage)), default=0)
    return largest + fp.nbytes(fp.sent)


# ---- the model ------------------------------------------------------------------------------------------
class MemoryModel:
    """Everything the estimate needs that does not depend on the activation plan, computed once:
    per-stage footprints (one meta forward), static bytes, and schedules per recompute plan.

    Estimates are per pipeline rank (one device of each). With a virtual-stage schedule the
    partition may have ``P·v`` stages, one per chunk (as ``MerakTrainer`` cuts it): a rank is then
    the sum of its chunks - their parameters (a shared one once), optimizer states, and each
    chunk's own activations walked over the rank's instruction list - and activation plans have
    one entry per chunk. A partition into ``P`` stages prices each chunk as an equal share of its
    rank's stage instead (what the cluster planner assumes).

    ``tp_plan`` is the automatic tensor-parallel plan (made here when ``layout.tp > 1``).
    """

    def __init__(self, plan: Any, layout: Layout, tp_plan: Any = None) -> None:
        placement = layout.placement
        if plan.num_stages not in (layout.pp, placement.num_virtual):
            raise ValueError(f"layout pp={layout.pp} ({placement}) but the partition plan has {plan.num_stages} stages; "
                             f"shard the graph into pp stages, or pp x chunks = {placement.num_virtual} to price "
                             f"each chunk on its own")
        traced_batch = _traced_batch_size(plan.graph)
        if traced_batch is not None and traced_batch != layout.micro_batch_size:
            raise ValueError(f"the graph was traced with a batch of {traced_batch} but the layout trains micro-batches "
                             f"of {layout.micro_batch_size}; trace with example inputs of the micro-batch size")
        if layout.tp > 1 and tp_plan is None:
            from merak.runtime.tensor_parallel import plan_tensor_parallel

            tp_plan = plan_tensor_parallel(plan.graph, layout.tp)
        self.plan, self.layout, self.tp_plan, self.placement = plan, layout, tp_plan, placement
        #: whether each chunk is a stage of the partition, priced on its own
        self.per_chunk = placement.num_chunks > 1 and plan.num_stages == placement.num_virtual
        # an expert bank's internal activations are 1/tp per rank in both MoE modes (1/tp of each
        # expert's features, or the tokens of 1/tp of the experts)
        sharded = frozenset((*tp_plan.layouts, *(e.node for e in tp_plan.experts.values()))) if tp_plan is not None else frozenset()
        self.footprints = stage_footprints(plan, layout.precision, sharded, layout.tp)
        self.workspace = [_workspace(fp, plan, s) for s, fp in enumerate(self.footprints)]
        self.rank_static = [static_bytes(plan, self.stages_of(r), layout, tp_plan) for r in range(layout.pp)]
        self._schedules = lru_cache(maxsize=256)(self._build)

    @property
    def num_chunks(self) -> int:
        """Model chunks per rank under the layout's schedule (1 without virtual stages)."""
        return self.placement.num_chunks

    def stages_of(self, rank: int) -> list[int]:
        """The partition stages on ``rank``'s device: its chunks' virtual stages, or its one stage."""
        return self.placement.chunks_of(rank) if self.per_chunk else [rank]

    def recompute_plan(self, activation_plan: ActivationPlan) -> RecomputePlan:
        """What the schedules read from ``activation_plan``: a fraction per rank, or per rank and
        chunk (``RecomputePlan.from_virtual_stages``, as ``MerakTrainer`` hands it over)."""
        plan = activation_plan.recompute_plan()
        return RecomputePlan.from_virtual_stages(plan, self.placement) if self.per_chunk else plan

    def _build(self, key: tuple) -> list[list[Instruction]]:
        plan = RecomputePlan.per_chunk(key) if self.per_chunk else RecomputePlan(key)
        return build_all(self.layout.schedule, self.layout.pp, self.layout.num_microbatches, plan,
                         self.placement.num_chunks)

    def instructions(self, activation_plan: ActivationPlan, stage: int) -> list[Instruction]:
        """Rank ``stage``'s instruction list when trained with ``activation_plan``."""
        plan = self.recompute_plan(activation_plan)
        return self._schedules(plan.chunk_fractions if self.per_chunk else plan.fractions)[stage]

    def stage_memory(self, activation_plan: ActivationPlan, stage: int) -> StageMemory:
        """The estimate for one device of pipeline rank ``stage`` under ``activation_plan``."""
        stages = self.stages_of(stage)
        share = 1.0 if self.per_chunk else 1.0 / self.num_chunks
        sizes = [_ChunkBytes.of(self.footprints[k], activation_plan.actions(k), share) for k in stages]
        if not self.per_chunk:
            sizes *= self.num_chunks
        peak, inflight, host = _activation_peak(self.instructions(activation_plan, stage), sizes)
        params, grads, optimizer = self.rank_static[stage]
        actions = {n: a for k in stages for n, a in activation_plan.actions(k).items()}

        def named(action: LayerAction) -> tuple[str, ...]:
            return tuple(n for n, a in actions.items() if a is action)

        def per_microbatch(materialize: bool) -> int:
            return sum(self.footprints[k].nbytes(self.footprints[k].retained({} if materialize else
                                                                              activation_plan.actions(k)))
                       for k in stages)

        return StageMemory(
            stage=stage, params_bytes=params, grads_bytes=grads, optimizer_bytes=optimizer,
            activation_bytes=peak, workspace_bytes=max(self.workspace[k] for k in stages), peak_inflight=inflight,
            microbatch_bytes=per_microbatch(False), full_microbatch_bytes=per_microbatch(True),
            layers=tuple(p.name for k in stages for p in self.footprints[k].layers),
            recomputed_layers=named(LayerAction.RECOMPUTE), selective_layers=named(LayerAction.SELECTIVE),
            offloaded_layers=named(LayerAction.OFFLOAD), host_bytes=host,
        )

    def estimate(self, activation_plan: ActivationPlan) -> list[StageMemory]:
        """One :class:`StageMemory` per pipeline rank."""
        if activation_plan.num_stages != self.plan.num_stages:
            raise ValueError(f"activation plan has {activation_plan.num_stages} stages, the partition {self.plan.num_stages}")
        return [self.stage_memory(activation_plan, r) for r in range(self.layout.pp)]


def _traced_batch_size(graph: Any) -> int | None:
    for value in graph.traced.example_inputs.values():
        if hasattr(value, "shape") and len(value.shape) >= 1:
            return int(value.shape[0])
    return None


def estimate_memory(sharding_plan: Any, layout: Layout, activation_plan: ActivationPlan | None = None,
                    *, tp_plan: Any = None) -> list[StageMemory]:
    """Peak device memory of every stage of ``sharding_plan`` trained as ``layout`` with the
    per-layer ``activation_plan`` (default: keep everything)."""
    model = MemoryModel(sharding_plan, layout, tp_plan)
    plan = activation_plan or ActivationPlan.from_mode("none", sharding_plan)
    return model.estimate(plan)


# ---- units and the table ----------------------------------------------------------------------------
def parse_bytes(text: str | int) -> int:
    """``"80GB"`` / ``"80GiB"`` -> bytes (both 2**30 per GB: devices sold as "80 GB" hold 80 GiB),
    ``"512MB"``, or a byte count. The same reading as the cluster planner's (one meaning for
    ``max_memory_per_device`` everywhere)."""
    value = int(_parse_size(text))
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def memory_table(stages: Sequence[StageMemory], budget: int | None = None) -> str:
    """One row per stage: static bytes, activations, total, and what each stage's layers do."""
    head = ["stage", "params", "grads", "optimizer", "activations", "workspace", "total", "in-flight",
            "per-mb kept", "layers kept/recomp/sel/offl"]
    rows = []
    for m in stages:
        n = len(m.layers)
        other = len(m.recomputed_layers) + len(m.selective_layers) + len(m.offloaded_layers)
        rows.append([str(m.stage), format_bytes(m.params_bytes), format_bytes(m.grads_bytes),
                     format_bytes(m.optimizer_bytes), format_bytes(m.activation_bytes),
                     format_bytes(m.workspace_bytes), format_bytes(m.total_bytes), str(m.peak_inflight),
                     format_bytes(m.microbatch_bytes),
                     f"{n - other}/{len(m.recomputed_layers)}/{len(m.selective_layers)}/{len(m.offloaded_layers)}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if budget is not None:
        worst = max(m.total_bytes for m in stages)
        lines.append(f"budget {format_bytes(budget)} per device; largest stage {format_bytes(worst)} "
                     f"({100 * worst / budget:.1f}% of the budget)")
    return "\n".join(lines)


# ---- CLI -----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m merak.runtime.memory",
        description="Estimate per-stage device memory of a model (built on meta from its config) for a 3D layout.",
    )
    p.add_argument("--config", nargs="+", required=True, metavar="CONFIG",
                   help="a config.json path or a model_type with key=value overrides (as python -m merak.partitioner)")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=None, help="micro-batches per step (default: 4 x pp)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's context, at most 2048)")
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    p.add_argument("--recompute", choices=RECOMPUTE_MODES, default="none")
    p.add_argument("--budget", default=None, help="memory per device, e.g. 80GB (= 80 GiB): plan the recomputation to fit")
    p.add_argument("--offload", action="store_true",
                   help="with --budget: let the planner offload layers to host memory where that is cheaper")
    p.add_argument("--host-link-gbps", type=float, default=None, metavar="GB/s",
                   help="host<->device bandwidth for --offload (default: 25 GB/s, a PCIe 4.0 x16 link)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16")
    p.add_argument("--zero-stage", type=int, choices=(0, 1), default=0)
    p.add_argument("--json", action="store_true", help="print {stages: [...], layout, budget_bytes, seconds} as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from merak.partitioner.configs import build_model, example_inputs, load_config
    from merak.partitioner.proxy_graph import trace
    from merak.partitioner.sharding import shard
    from merak.runtime.memory.planner import DEFAULT_HOST_LINK_BYTES_PER_S, MemoryBudgetError, plan_activations

    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        budget = parse_bytes(args.budget) if args.budget is not None else None
        layout = Layout(dp=args.dp, tp=args.tp, pp=args.pp, micro_batch_size=args.micro_batch_size,
                        num_microbatches=args.microbatches or 4 * args.pp, schedule=args.schedule,
                        optimizer=args.optimizer, precision=args.precision, zero_stage=args.zero_stage)
        model = build_model(load_config(args.config))
        graph = trace(model, example_inputs(model, args.micro_batch_size, args.seq))
        plan = shard(graph, layout.placement.num_virtual)  # with virtual stages: one stage per chunk
        memory = MemoryModel(plan, layout)
        link = args.host_link_gbps * 1e9 if args.host_link_gbps else DEFAULT_HOST_LINK_BYTES_PER_S
        activation_plan = plan_activations(plan, layout, args.recompute, budget, offload=args.offload,
                                           host_link_bytes_per_s=link, memory=memory)
        stages = memory.estimate(activation_plan)
    except MemoryBudgetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"model": type(model).__name__, "layout": dataclasses.asdict(layout),
                          "recompute": args.recompute, "budget_bytes": budget, "seconds": seconds,
                          "stages": [m.to_json() for m in stages]}, indent=2))
        return 0
    seq = next(iter(graph.traced.example_inputs.values())).shape[-1]
    print(f"{type(model).__name__}: {layout.describe()}, sequence {seq}, recompute={args.recompute}"
          f"{' + offload' if args.offload else ''} (estimated in {seconds:.1f}s)")
    print(memory_table(stages, budget))
    return 0

