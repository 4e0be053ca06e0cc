"""Run one stage's instruction list: the only place where schedules touch tensors.

The schedule generators never see a tensor and this module never decides an order: it maps
each :class:`~merak.runtime.pipeline.instructions.Op` to a handler (a dispatch table, as DeepSpeed's
pipeline engine does) and executes the list it is given. Per micro-batch it keeps only what
the next instruction for that micro-batch needs, and drops it as soon as possible.

Semantics that the schedules and the validator rely on:

* ``LOAD`` takes from the micro-batch dict only the keys this stage reads (``stage.data_inputs``;
  on the last stage also what a custom ``loss_fn`` reads), so data is never piped through stages.
* ``FORWARD`` of a micro-batch that has a ``RECOMPUTE`` later in the list applies the stage's
  activation actions (:mod:`merak.runtime.memory.stage_activations`: recomputed layers keep only their
  inputs, offloaded ones move their saved tensors to host memory); ``RECOMPUTE`` re-runs that
  micro-batch's checkpointed layers (same RNG and autocast state) so backward finds their
  tensors ready and does not recompute again. Every other micro-batch keeps all activations.
  Without an ``activation_plan`` the whole stage is the one recomputed unit.
* The last stage's loss is divided by the number of micro-batches before backward, so the
  accumulated gradient is that of the mean loss over the whole (global) batch, as in a single
  process; DP then averages over replicas. ``run(..., loss_weights=w)`` multiplies micro-batch
  ``m``'s loss by ``w[m]`` instead (the trainer's per-token normalisation, as HF's
  ``num_items_in_batch``); the step's reported loss is then the weighted sum.
* A model that returns a tuple has its outputs named ``output_0, output_1, ...``; as in HF's
  Trainer, the loss is then the first one.
* In a forward-only list (no backward at all, e.g. evaluation) a micro-batch's tensors are
  dropped as soon as they were sent; on the last stage ``on_output(m, outputs, loss)`` sees each
  micro-batch's outputs right after its forward, and they are dropped after it returns, so a
  pass never holds more than the micro-batches in flight.
* Point-to-point instructions run one issue group at a time: an instruction marked
  ``with_next`` (exchanges the communication pass grouped) is posted together with the next
  one as one :meth:`~merak.runtime.distributed.p2p.P2P.exchange`, as NCCL needs for ranks
  sending to each other. Sends are asynchronous, receives block with a timeout; a received
  tensor requires grad exactly when the sent one did (see :mod:`merak.runtime.distributed.p2p`).

Virtual stages (:mod:`merak.runtime.pipeline.placement`): a rank may hold several model chunks
(``stage`` is then the list of them, indexed by chunk, and ``placement`` says where every
chunk lives). Per-micro-batch state is kept per ``(chunk, micro-batch)``; each chunk sends to
and receives from the rank holding its neighbouring virtual stage; a hop between two chunks of
the same rank (the turn of a V) hands the tensors over in memory, cut from the producer's graph
exactly as a message would be, so both chunks' backward passes stay separate instructions.
Parameters shared by two chunks of one rank must be one ``Parameter`` object (see
:func:`merak.partitioner.build_chunks`); their gradients then simply accumulate.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from merak.runtime.memory.policy import WHOLE_STAGE, ActivationPlan, LayerAction
from merak.runtime.pipeline.grad_reduce import (
    DataParallelReducer,
    broadcast_tied_parameters,
    reduce_tied_gradients,
)
from merak.runtime.distributed.grid import Grid
from merak.runtime.pipeline.instructions import Instruction, Op
from merak.runtime.pipeline.replay import groups_of
from merak.runtime.pipeline.placement import Placement
from merak.runtime.distributed import collectives
from merak.runtime.distributed.p2p import P2P, Incoming, Outgoing
from merak.runtime.memory.precision import MixedPrecision
from merak.runtime.memory.stage_activations import StageActivations
from merak.runtime.pipeline.weight_grad_store import WeightGradStore, defer_weight_gradients

_SENDS = (Op.SEND_ACT, Op.SEND_GRAD)

LossFn = Callable[[Mapping[str, Any], Mapping[str, Any]], torch.Tensor]

#: Which busy-time total (0: forward, 1: backward) an instruction's seconds count toward.
_COMPUTE_KIND = {Op.FORWARD: 0, Op.RECOMPUTE: 0, Op.BACKWARD: 1, Op.BACKWARD_INPUT: 1, Op.BACKWARD_WEIGHT: 1}


class Stage(Protocol):
    """What the executor needs from a stage module (see ``merak.partitioner.StageModule``)."""

    data_inputs: tuple[str, ...]
    recv_inputs: tuple[str, ...]
    send_outputs: tuple[str, ...]
    tied_parameters: dict[str, str]

    def __call__(self, data: Mapping[str, Any], received: Mapping[str, Any]) -> dict[str, Any]: ...

    def named_parameters(self) -> Any: ...


@dataclass
class _MicroBatch:
    data: dict[str, Any] = field(default_factory=dict)
    received: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] | None = None
    loss: torch.Tensor | None = None
    input_grads: dict[str, Any] | None = None
    output_grads: dict[str, Any] | None = None


@dataclass
class _Chunk:
    """One model chunk of this rank and where its neighbours are."""

    index: int
    stage: Stage
    virtual_stage: int
    is_first: bool
    is_last: bool
    #: global rank of the previous / next virtual stage; ``None`` at the model's ends or when
    #: it is another chunk of this rank (then ``local_prev`` / ``local_next`` name that chunk)
    prev_rank: int | None
    next_rank: int | None
    local_prev: int | None
    local_next: int | None
    activations: StageActivations


@dataclass
class StepResult:
    """Outcome of one pipeline step on this rank."""

    loss: float | None  # mean micro-batch loss of this DP replica (last stage only)
    num_microbatches: int
    seconds: float
    skipped: bool = False  # optimizer step skipped (e.g. fp16 overflow)
    #: wall seconds this rank spent computing: forward passes (recomputation included) and
    #: backward passes (input and weight gradients) - the rest of ``seconds`` is waiting,
    #: communication and the optimizer. What pipeline calibration balances.
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    #: the same two totals per model chunk (one entry per chunk of this rank, in chunk order):
    #: what calibration balances under virtual stages
    chunk_seconds: tuple[tuple[float, float], ...] = ()


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def _needs_grad(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


class PipelineExecutor:
    """Executes instruction lists for one stage module on one rank of the grid.

    ``optimizer`` may be ``None`` (gradients are then left in ``.grad`` — handy for tests).
    ``before_optimizer_step`` runs after all gradient reductions and may return ``False`` to
    skip the step (gradient clipping lives there, not here).
    ``zero_bubble=True`` patches Linear/Conv1D layers so ``BACKWARD_INPUT`` leaves their weight
    gradients to ``BACKWARD_WEIGHT``; without it those two ops still work, just unsplit.
    ``precision`` (default fp32) runs forwards under autocast and, for fp16, scales the loss and
    skips the step on every rank when any rank's gradients overflow (:mod:`merak.runtime.memory.precision`).
    ``activation_plan`` gives this stage's per-layer keep / recompute / selective / offload
    actions, applied to the micro-batches that have a ``RECOMPUTE`` instruction; ``None`` treats
    the whole stage as one recomputed unit (whole-stage recomputation).
    ``stage`` may be a list of model chunks (virtual stages) placed by ``placement``; the
    activation plan then has one stage per virtual stage.
    """

    def __init__(
        self,
        stage: Stage | Sequence[Stage],
        grid: Grid,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        device: torch.device | str = "cpu",
        loss_fn: LossFn | None = None,
        timeout_s: float = 300.0,
        bucket_bytes: int = 25 * 2**20,
        zero_bubble: bool = False,
        before_optimizer_step: Callable[[], bool | None] | None = None,
        after_optimizer_step: Callable[[], None] | None = None,
        precision: MixedPrecision | None = None,
        activation_plan: ActivationPlan | None = None,
        placement: Placement | None = None,
    ) -> None:
        stages: list[Stage] = list(stage) if isinstance(stage, (list, tuple)) else [stage]  # type: ignore[list-item]
        self.placement = placement or Placement.flat(grid.num_stages)
        if len(stages) != self.placement.num_chunks:
            raise ValueError(f"rank {grid.rank} got {len(stages)} model chunks but the placement "
                             f"({self.placement}) puts {self.placement.num_chunks} on each rank")
        self.stages, self.stage, self.grid, self.optimizer = stages, stages[0], grid, optimizer
        self.device = torch.device(device)
        self.loss_fn, self.timeout_s = loss_fn, timeout_s
        self.before_optimizer_step = before_optimizer_step
        self.after_optimizer_step = after_optimizer_step
        self.precision = precision or MixedPrecision()
        self.p2p = P2P.for_grid(grid, self.device, timeout_s)
        self.is_first, self.is_last = grid.is_first_stage, grid.is_last_stage
        self.chunks = [self._chunk(c, s, activation_plan) for c, s in enumerate(stages)]
        self.activations = self.chunks[0].activations
        params = _unique_parameters(stages)
        self.tied = {}
        for s in stages:
            named = dict(s.named_parameters())
            self.tied.update({key: named[local] for key, local in s.tied_parameters.items()})
        # Tied copies on other ranks are summed over the tie group; when the placement puts the
        # model's first and last chunk on one rank (the V) they are one Parameter here instead.
        ends_apart = self.placement.locate(0)[0] != self.placement.locate(self.placement.num_virtual - 1)[0]
        self.tie_size = len(grid.tied_ranks) if self.tied and ends_apart else 1
        self.weight_store = WeightGradStore()
        late = {id(p) for p in self.tied.values()}
        if zero_bubble:
            for s in stages:
                patched = defer_weight_gradients(s, self.weight_store)  # type: ignore[arg-type]
                # Autograd still fires their post-accumulate hooks during B (with no gradient), so
                # deferred weights must not count toward an early bucket: they finish only in W.
                late |= {id(s.get_submodule(name).weight) for name in patched}  # type: ignore[attr-defined]
        self.reducer = DataParallelReducer(
            [p for p in params if p.requires_grad], grid.dp_group, grid.dims.dp,
            bucket_bytes=bucket_bytes, timeout_s=timeout_s, late=late,
        )
        broadcast_tied_parameters(self.tied, grid.tied_group, grid.tied_ranks[0] if self.tied else 0,
                                  self.tie_size, timeout_s)
        self._handlers: dict[Op, Callable[[Instruction], None]] = {
            Op.LOAD: self._load,
            Op.RECV_ACT: self._communicate_one,
            Op.FORWARD: self._forward,
            Op.SEND_ACT: self._communicate_one,
            Op.RECOMPUTE: self._recompute,
            Op.RECV_GRAD: self._communicate_one,
            Op.BACKWARD: self._backward,
            Op.BACKWARD_INPUT: self._backward_input,
            Op.BACKWARD_WEIGHT: self._backward_weight,
            Op.SEND_GRAD: self._communicate_one,
            Op.REDUCE_TIED_GRADS: self._reduce_tied,
            Op.REDUCE_DP_GRADS: self._reduce_dp,
            Op.OPTIMIZER_STEP: self._optimizer_step,
        }

    def _chunk(self, index: int, stage: Stage, plan: ActivationPlan | None) -> _Chunk:
        where, rank = self.placement, self.grid.stage_id
        coord = self.grid.coord

        def neighbour(pos: tuple[int, int] | None) -> tuple[int | None, int | None]:
            if pos is None:
                return None, None
            if pos[0] == rank:
                return None, pos[1]
            return self.grid.layout.rank_of(pos[0], coord.dp, coord.tp), None

        prev_rank, local_prev = neighbour(where.prev(rank, index))
        next_rank, local_next = neighbour(where.next(rank, index))
        virtual = where.virtual_stage(rank, index)
        activations = StageActivations(stage, _stage_actions(plan, where, virtual), self.device)  # type: ignore[arg-type]
        return _Chunk(index, stage, virtual, where.is_first(rank, index), where.is_last(rank, index),
                      prev_rank, next_rank, local_prev, local_next, activations)

    # ---- the step ----------------------------------------------------------------------
    def run(self, instructions: Sequence[Instruction], microbatches: Sequence[Mapping[str, Any]],
            loss_weights: Sequence[float] | None = None,
            on_output: Callable[[int, Mapping[str, Any], torch.Tensor | None], None] | None = None) -> StepResult:
        """Execute one step. Every stage of a pipeline gets the same ``microbatches`` list.

        ``loss_weights`` (one per micro-batch; default ``1/M`` each) scale the last stage's
        micro-batch losses before backward. ``on_output`` is called on the last stage after each
        forward (for predictions); see the module docstring."""
        start = time.perf_counter()
        loads = sorted({i.microbatch for i in instructions if i.op is Op.LOAD})
        if loads != list(range(len(microbatches))):
            raise ValueError(
                f"schedule loads micro-batches {loads} but {len(microbatches)} were given; "
                f"build the schedule with num_microbatches={len(microbatches)}"
            )
        self._batches = microbatches
        self._num_mb = len(microbatches)
        self._weights = ([1.0 / self._num_mb] * self._num_mb if loss_weights is None
                         else [float(w) for w in loss_weights])
        self._on_output = on_output
        self._mb: dict[tuple[int, int], _MicroBatch] = {
            (c, m): _MicroBatch() for c in range(len(self.chunks)) for m in range(self._num_mb)}
        self._recomputed = {i.key for i in instructions if i.op is Op.RECOMPUTE}
        backward_ops = (Op.BACKWARD, Op.BACKWARD_INPUT)
        last_backward = max((n for n, i in enumerate(instructions) if i.op in backward_ops), default=-1)
        self._forward_only = last_backward < 0
        self._skipped = False
        busy = [[0.0, 0.0] for _ in self.chunks]  # per chunk: forward, backward seconds
        groups = groups_of(instructions)
        receives = _receives_ahead(instructions, groups)
        for g, group in enumerate(groups):
            n, instruction = group[0], instructions[group[0]]
            if n == last_backward:
                self.reducer.arm()
            began = time.perf_counter()
            try:
                # post the receives of the next group that has any, so their bytes move while
                # this group computes (host p2p only; see P2P.prefetch)
                self.p2p.prefetch([self._incoming(instructions[p]) for p in receives.pop(g, ())])
                if len(group) > 1:  # exchanges grouped by the comm pass: only p2p instructions
                    self._communicate([instructions[p] for p in group])
                else:
                    self._handlers[instruction.op](instruction)
            except Exception as exc:
                exc.add_note(f"while executing instruction {' '.join(str(instructions[p]) for p in group)} "
                             f"on rank {self.grid.rank}")
                raise
            kind = _COMPUTE_KIND.get(instruction.op)
            if kind is not None:
                busy[instruction.chunk][kind] += time.perf_counter() - began
        self.p2p.wait_sends()
        losses = [(m.loss, self._weights[key[1]]) for key, m in self._mb.items() if m.loss is not None]
        if not losses:
            loss = None
        elif loss_weights is None:
            loss = float(torch.stack([l for l, _ in losses]).detach().mean())
        else:
            loss = float(sum(float(l.detach()) * w for l, w in losses))
        self._mb.clear()
        for chunk in self.chunks:
            chunk.activations.release_all()
        return StepResult(loss, self._num_mb, time.perf_counter() - start, self._skipped,
                          sum(f for f, _ in busy), sum(b for _, b in busy), tuple((f, b) for f, b in busy))

    def close(self) -> None:
        """Detach this executor from the stage's parameters (its gradient hooks), for an executor
        that is dropped while the model lives on (e.g. after a calibration run)."""
        self.reducer.close()

    # ---- handlers ----------------------------------------------------------------------
    def _communicate_one(self, ins: Instruction) -> None:
        self._communicate([ins])

    def _load(self, ins: Instruction) -> None:
        batch, chunk = self._batches[ins.microbatch], self.chunks[ins.chunk]
        wanted = set(chunk.stage.data_inputs)
        if chunk.is_last and self.loss_fn is not None:
            wanted = set(batch)  # a custom loss may read any key (labels, weights ...)
        missing = set(chunk.stage.data_inputs) - set(batch)
        if missing:
            raise KeyError(
                f"stage {chunk.virtual_stage} needs batch keys {sorted(missing)} that micro-batch "
                f"{ins.microbatch} lacks (it has {sorted(batch)}); check the data collator"
            )
        self._mb[ins.key].data = {k: _to_device(batch[k], self.device) for k in wanted}

    def _what(self, kind: str, ins: Instruction, sender: int) -> str:
        """A message's name in timeout errors: kind, micro-batch and (with chunks) the sender."""
        if self.placement.num_chunks == 1:
            return f"{kind} of micro-batch {ins.microbatch}"
        return f"{kind} of micro-batch {ins.microbatch} from virtual stage {sender}"

    def _run_stage(self, mb: _MicroBatch, ins: Instruction) -> None:
        chunk = self.chunks[ins.chunk]
        apply = ins.key in self._recomputed  # the schedule asks this micro-batch to drop memory
        with self.precision.autocast(self.device):
            mb.outputs = chunk.activations.forward(ins.microbatch, apply, mb.data, mb.received)
        if chunk.is_last:
            mb.loss = self._loss(mb.outputs, mb.data)
            if self._forward_only:
                if self._on_output is not None:
                    self._on_output(ins.microbatch, mb.outputs, mb.loss)
                mb.outputs, mb.data, mb.received = None, {}, {}
                if mb.loss is not None:
                    mb.loss = mb.loss.detach()

    def _loss(self, outputs: Mapping[str, Any], data: Mapping[str, Any]) -> torch.Tensor | None:
        if self.loss_fn is not None:
            return self.loss_fn(outputs, data)
        key = loss_key(outputs)
        if key is None:
            if self._forward_only:
                return None  # prediction without labels
            raise KeyError(
                f"the last stage's outputs {sorted(outputs)} contain no 'loss': give the model "
                f"labels in the batch, or pass loss_fn=(outputs, batch) -> loss"
            )
        return outputs[key]

    def _forward(self, ins: Instruction) -> None:
        chunk, mb = self.chunks[ins.chunk], self._mb[ins.key]
        if chunk.local_prev is not None:  # the turn of a V: the producer is this rank's other chunk
            producer = self._mb[(chunk.local_prev, ins.microbatch)]
            assert producer.outputs is not None, f"{ins}: its input chunk {chunk.local_prev} has not run forward"
            sent = self.chunks[chunk.local_prev].stage.send_outputs
            mb.received = _as_leaves({n: producer.outputs[n] for n in sent})
        self._run_stage(mb, ins)

    def _communicate(self, group: Sequence[Instruction]) -> None:
        """Run one issue group of p2p instructions (a lone one, or exchanges the communication
        pass grouped) as one :meth:`P2P.exchange`, as NCCL needs for ranks sending to each other."""
        sends = [self._outgoing(ins) for ins in group if ins.op in _SENDS]
        recvs = [ins for ins in group if ins.op not in _SENDS]
        got = self.p2p.exchange(sends, [self._incoming(ins) for ins in recvs])
        for ins, obj in zip(recvs, got):
            if ins.op is Op.RECV_ACT:
                self._mb[ins.key].received = _as_leaves(obj)
            else:
                self._mb[ins.key].output_grads = obj

    def _outgoing(self, ins: Instruction) -> Outgoing:
        chunk, mb = self.chunks[ins.chunk], self._mb[ins.key]
        if ins.op is Op.SEND_ACT:
            assert mb.outputs is not None, f"{ins}: send before forward"
            assert chunk.next_rank is not None, f"{ins}: virtual stage {chunk.virtual_stage} has no remote successor"
            out = Outgoing(self.precision.on_wire({n: mb.outputs[n] for n in chunk.stage.send_outputs}),
                           chunk.next_rank, self._what("activations", ins, chunk.virtual_stage),
                           channel=("activations", chunk.virtual_stage))
            if self._forward_only:  # nothing will come back for it: drop what the forward held
                mb.outputs, mb.data, mb.received = None, {}, {}
            return out
        assert mb.input_grads is not None, f"{ins}: send before backward"
        assert chunk.prev_rank is not None, f"{ins}: virtual stage {chunk.virtual_stage} has no remote predecessor"
        grads, mb.input_grads = mb.input_grads, None
        return Outgoing(grads, chunk.prev_rank, self._what("gradients", ins, chunk.virtual_stage),
                        channel=("gradients", chunk.virtual_stage - 1))

    def _incoming(self, ins: Instruction) -> Incoming:
        chunk = self.chunks[ins.chunk]
        if ins.op is Op.RECV_ACT:
            assert chunk.prev_rank is not None, f"{ins}: virtual stage {chunk.virtual_stage} has no remote predecessor"
            return Incoming(chunk.prev_rank, self._what("activations", ins, chunk.virtual_stage - 1),
                            channel=("activations", chunk.virtual_stage - 1))
        assert chunk.next_rank is not None, f"{ins}: virtual stage {chunk.virtual_stage} has no remote successor"
        return Incoming(chunk.next_rank, self._what("gradients", ins, chunk.virtual_stage + 1),
                        channel=("gradients", chunk.virtual_stage))

    def _recompute(self, ins: Instruction) -> None:
        if self._mb[ins.key].outputs is None:
            raise RuntimeError(f"{ins}: recompute without a preceding forward")
        self.chunks[ins.chunk].activations.recompute(ins.microbatch)

    def _backward(self, ins: Instruction, defer_weights: bool = False) -> None:
        chunk, mb = self.chunks[ins.chunk], self._mb[ins.key]
        if mb.outputs is None:
            raise RuntimeError(f"{ins}: no activations to backward through (missing forward or recompute)")
        if chunk.local_next is not None:  # the turn of a V: the gradient comes from this rank's other chunk
            consumer = self._mb[(chunk.local_next, ins.microbatch)]
            assert consumer.input_grads is not None, f"{ins}: chunk {chunk.local_next} has not run backward"
            mb.output_grads, consumer.input_grads = consumer.input_grads, None
        if chunk.is_last:
            tensors, grads = [self.precision.scale_loss(mb.loss * self._weights[ins.microbatch])], [None]
        else:
            assert mb.output_grads is not None, f"{ins}: backward before its gradient was received"
            pairs = [(mb.outputs[n], mb.output_grads.get(n)) for n in chunk.stage.send_outputs]
            pairs = [(t, g) for t, g in pairs if _needs_grad(t) and g is not None]
            tensors, grads = [t for t, _ in pairs], [g for _, g in pairs]
        store_key = ins.microbatch if self.placement.num_chunks == 1 else ins.key
        ctx = self.weight_store.deferring(store_key) if defer_weights else contextlib.nullcontext()  # type: ignore[arg-type]
        if tensors:
            with ctx:
                torch.autograd.backward(tensors, grads)
        mb.input_grads = {n: (v.grad if _needs_grad(v) else None) for n, v in mb.received.items()}
        mb.outputs = mb.output_grads = None
        mb.received = {}
        if mb.loss is not None:
            # Keep the value for the step's mean, not the graph: the graph pins this micro-batch's
            # received inputs and their gradients until the end of the step.
            mb.loss = mb.loss.detach()
        chunk.activations.release(ins.microbatch)

    def _backward_input(self, ins: Instruction) -> None:
        self._backward(ins, defer_weights=True)

    def _backward_weight(self, ins: Instruction) -> None:
        self.weight_store.flush(ins.microbatch if self.placement.num_chunks == 1 else ins.key)  # type: ignore[arg-type]

    def _reduce_tied(self, ins: Instruction) -> None:
        reduce_tied_gradients(self.tied, self.grid.tied_group, self.tie_size, self.timeout_s)

    def _reduce_dp(self, ins: Instruction) -> None:
        pending = self.weight_store.pending()
        if pending:
            raise RuntimeError(f"weight gradients of micro-batches {pending} never ran (no W instruction)")
        self.reducer.finish()

    def _optimizer_step(self, ins: Instruction) -> None:
        params = iter(_unique_parameters(self.stages))
        if not self.precision.unscale_and_check(params, self.timeout_s):
            self._skipped = True  # fp16 overflow somewhere: every rank skips this step
        elif self.before_optimizer_step is not None and self.before_optimizer_step() is False:
            self._skipped = True
        elif self.optimizer is not None:
            self.optimizer.step()
            if self.after_optimizer_step is not None:
                self.after_optimizer_step()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)


def all_reduce_mean_loss(loss: float | None, grid: Grid, timeout_s: float = 300.0) -> float:
    """The global mean loss of a step, identical on every rank.

    The last stage of each DP replica contributes its replica's mean; every other rank adds 0.
    """
    (total,) = collectives.reduce_values([loss if loss is not None else 0.0],
                                         "the loss all-reduce at the end of a step", timeout_s=timeout_s)
    return total / (grid.dims.dp * grid.dims.tp)


def loss_key(outputs: Mapping[str, Any]) -> str | None:
    """Which output is the loss: ``loss``, or - for a model that returned a tuple, whose outputs
    are named ``output_0, output_1, ...`` - the first one, as HF's Trainer takes ``outputs[0]``."""
    if "loss" in outputs:
        return "loss"
    if "output_0" in outputs and all(k.startswith("output_") for k in outputs):
        return "output_0"
    return None


def _stage_actions(plan: ActivationPlan | None, placement: Placement, virtual_stage: int) -> dict[str, LayerAction]:
    """One chunk's ``{layer: action}``; without a plan the whole chunk is recomputed."""
    if plan is None:
        return {WHOLE_STAGE: LayerAction.RECOMPUTE}
    if plan.num_stages != placement.num_virtual:
        raise ValueError(f"the activation plan has {plan.num_stages} stages but the pipeline {placement.num_virtual} "
                         f"({placement}); build it from this pipeline's sharding plan")
    return plan.actions(virtual_stage)


def _receives_ahead(instructions: Sequence[Instruction], groups: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    """group index -> positions of the receives to prefetch when it starts: each group that
    receives is prefetched right after the previous one ran (or at the start), so a
    sender's messages are posted in the order the list takes them - the comm pass put them
    in its send order - and every receive once."""
    receiving = [g for g, group in enumerate(groups)
                 if any(instructions[p].op in (Op.RECV_ACT, Op.RECV_GRAD) for p in group)]
    starts = [0] + [g + 1 for g in receiving]
    return {start: [p for p in groups[g] if instructions[p].op in (Op.RECV_ACT, Op.RECV_GRAD)]
            for start, g in zip(starts, receiving)}


def _unique_parameters(stages: Sequence[Stage]) -> list[torch.nn.Parameter]:
    """Every parameter of this rank's chunks once (chunks of one rank may share tied ones)."""
    seen: dict[int, torch.nn.Parameter] = {}
    for stage in stages:
        for _, p in stage.named_parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def _as_leaves(received: dict[str, Any]) -> dict[str, Any]:
    """Received tensors as the inputs of this chunk's graph: those the producer differentiates
    require grad, so the backward pass yields the gradient to hand back (a mask or table that
    needs none gets none). A local hand-over is detached first, cutting the producer's graph
    exactly where a message would."""
    out = {}
    for name, value in received.items():
        if isinstance(value, torch.Tensor):
            wanted = value.requires_grad and value.is_floating_point()
            value = value.detach()
            if wanted:
                value.requires_grad_(True)
        out[name] = value
    return out
