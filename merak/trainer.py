"""``MerakTrainer``: a ``transformers.Trainer`` whose training step is a pipeline schedule.

What changes relative to HF's Trainer, and why:

* **The model it holds is the local stage.** At construction the user's model (real or on the
  meta device) is traced, cut into ``pp`` stages and only this rank's stage is built; HF's
  machinery (optimizer and scheduler creation, callbacks, logging, ``report_to``) then works on
  that stage as if it were the model. The original model is kept for export.
* **One optimizer step = one schedule run.** HF's inner loop calls ``training_step`` once per
  micro-batch; a pipeline must see all micro-batches of a step at once. ``train`` is therefore
  a short loop of its own that keeps HF's contracts: ``TrainerState``/``log_history`` (the
  global mean loss, identical on every rank), callback events (``DefaultFlowCallback`` decides
  when to log, evaluate and save), the LR scheduler, ``max_grad_norm`` (global norm over all
  stages) and the tqdm progress bar (HF's ``ProgressCallback``, rank 0).
* **Data** comes from :class:`~merak.data.StepBatches`: the global batch of a step is the same
  samples whatever the layout, so a run on (dp, tp, pp) reproduces the single-process curve.
"""

from __future__ import annotations

import inspect
import logging
import math
import resource
import time
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, default_data_collator
from transformers.trainer_utils import TrainOutput

import merak
from merak.arguments import MerakArguments
from merak.data import StepBatches, eval_microbatches
from merak.launch.env import read_launch_env
from merak.partitioner import StageChunks, build_chunks, build_stage, shard, trace
from merak.partitioner.meta import meta_like
from merak.runtime.pipeline.executor import LossFn, PipelineExecutor, all_reduce_mean_loss
from merak.runtime.tensor_parallel import apply_tensor_parallel, plan_tensor_parallel, tp_grad_norm_squared
from merak.runtime.distributed.p2p import wait_with_timeout
from merak.runtime.memory.precision import MixedPrecision
from merak.runtime.memory.zero import shard_optimizer_states
from merak.runtime.memory.policy import ActivationPlan
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.placement import Placement
from merak.runtime.pipeline.schedule import build as build_schedule, placement_for, uses_weight_passes
from merak.runtime.pipeline.schedules import forward_only

logger = logging.getLogger("merak")


class MerakTrainer(Trainer):
    """Drop-in ``transformers.Trainer`` that trains with 3D parallelism.

    ``model`` is the user's unmodified model (``nn.Module`` or HF ``PreTrainedModel``), with
    real weights or built under :func:`merak.init_empty_weights`. ``loss_fn(outputs, batch)``
    replaces the model's own loss (by default the model computes it from ``labels``).
    Call :func:`merak.init` first; without it a pure data-parallel grid over all ranks is used.
    """

    def __init__(
        self,
        model: nn.Module,
        args: MerakArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Callable[[list[Any]], dict[str, Any]] | None = None,
        loss_fn: LossFn | None = None,
        **kwargs: Any,
    ) -> None:
        args = args if args is not None else MerakArguments(output_dir="merak_output")
        if not isinstance(args, MerakArguments):
            raise TypeError("MerakTrainer needs MerakArguments (a TrainingArguments subclass with "
                            "the pipeline fields); replace TrainingArguments(...) by MerakArguments(...)")
        collate = data_collator or default_data_collator
        if args.auto_parallel:
            _apply_auto_parallel(model, args, collate, train_dataset if train_dataset is not None else eval_dataset)
        self.grid = _grid()
        self.original_model = model
        self.loss_fn = loss_fn
        dataset = train_dataset if train_dataset is not None else eval_dataset
        if dataset is None:
            raise ValueError("MerakTrainer needs a train_dataset or eval_dataset: the model is traced "
                             "with one collated micro-batch of it")
        example = collate([dataset[i] for i in range(min(len(dataset), args.per_device_train_batch_size))])
        _check_batch_against_model(model, example)
        if self.grid.num_stages > 1 and args.gradient_accumulation_steps < self.grid.num_stages:
            logger.warning(
                "gradient_accumulation_steps=%d micro-batches < pp=%d stages: the pipeline will mostly "
                "idle; use at least %d (4x pp keeps the bubble under ~20%%)",
                args.gradient_accumulation_steps, self.grid.num_stages, 4 * self.grid.num_stages)
        self.placement = _placement(args, self.grid)
        start = time.perf_counter()
        graph = trace(model, {k: meta_like(v) for k, v in example.items()}, leaf_modules=args.leaf_modules)
        self.plan = shard(graph, self.placement.num_virtual, method=args.partition_method,
                          manual_cuts=args.partition_cuts or None,
                          cost_model=_partition_cost_model(args, graph, example))
        if args.partition_calibration_rounds and self.grid.num_stages > 1:
            calibration = _calibrate(self.plan, self.grid, args, example, loss_fn)
            self.plan = calibration.plan
            if self.grid.rank == 0:
                logger.info("%s", calibration.table())
        stage: nn.Module
        if self.placement.num_chunks > 1:
            stage = StageChunks(build_chunks(self.plan, self.placement.chunks_of(self.grid.stage_id),
                                             device=merak.get_device(), seed=args.seed, fuse=args.fuse_ops))
        else:
            stage = build_stage(self.plan, self.grid.stage_id, device=merak.get_device(), seed=args.seed,
                                fuse=args.fuse_ops)
        if args.load_weights_from:
            from merak.checkpoint import load_pretrained_weights

            load_pretrained_weights(stage, args.load_weights_from, model=model)
        self.tp_plan = None
        if args.tp_sub_microbatches > 1 and self.grid.dims.tp == 1:
            logger.warning("tp_sub_microbatches=%d has no effect without tensor parallelism (tp=1)",
                           args.tp_sub_microbatches)
        if self.grid.dims.tp > 1:
            if args.per_device_train_batch_size % args.tp_sub_microbatches:
                raise ValueError(f"per_device_train_batch_size={args.per_device_train_batch_size} cannot be split "
                                 f"into tp_sub_microbatches={args.tp_sub_microbatches} equal parts; use a multiple of "
                                 f"{args.tp_sub_microbatches} (or tp_sub_microbatches=1)")
            self.tp_plan = plan_tensor_parallel(graph, self.grid.dims.tp, args.tp_mapping, args.moe_parallel)
            apply_tensor_parallel(stage, self.grid, self.tp_plan, args.tp_sub_microbatches, args.p2p_timeout)
            if self.grid.rank == 0:
                logger.info("%s", self.tp_plan.table())
        if hasattr(model, "config"):
            stage.config = model.config  # HF code paths (saving, logging) look for it
        self._plan_seconds = time.perf_counter() - start
        self._tokens_per_sample = _tokens_per_sample(example)
        self._flops_per_microbatch = float(sum(s.flops for s in self.plan.stages))
        if self.grid.rank == 0:
            logger.info("Merak %s, partition plan (%.1fs):\n%s", self.grid.dims, self._plan_seconds,
                        self.plan.table())
        self.executor: PipelineExecutor | None = None
        self._layer_actions: ActivationPlan | None = None
        self._last_grad_norm: float | None = None
        self.precision = _mixed_precision(args, self.grid)
        super().__init__(model=stage, args=args, data_collator=collate, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, **kwargs)
        if args.max_memory_per_device:
            self._activation_plan()  # an infeasible budget is refused here, identically on every rank

    # ---- the pipeline pieces --------------------------------------------------------------
    @property
    def stage(self) -> nn.Module:
        return self.model

    def _pipeline_executor(self) -> PipelineExecutor:
        """The trainer's one executor, created on first use: it registers gradient hooks on the
        stage's parameters (and patches layers for zero-bubble), which must happen only once.
        ``train`` hands it the optimizer, which may not exist yet when ``evaluate`` runs first."""
        if self.executor is None:
            chunks = list(self.stage.chunks) if isinstance(self.stage, StageChunks) else self.stage
            self.executor = PipelineExecutor(
                chunks, self.grid, None, device=merak.get_device(), loss_fn=self.loss_fn,
                timeout_s=self.args.p2p_timeout, zero_bubble=uses_weight_passes(self.args.schedule),
                before_optimizer_step=self._clip_gradients, precision=self.precision,
                activation_plan=self._activation_plan(), placement=self.placement,
            )
        self.executor.optimizer = self.optimizer
        return self.executor

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """HF's optimizer (its class, parameter groups and hyper-parameters); under
        ``zero_stage=1`` rebuilt with its states sharded over the stage's DP group."""
        super().create_optimizer(model)
        if self.args.zero_stage == 1:
            self.optimizer = shard_optimizer_states(self.optimizer, self.grid.dp_group, self.grid.dims.dp,
                                                    self.args.p2p_timeout)
        return self.optimizer

    def _activation_plan(self) -> ActivationPlan:
        """Per stage and layer: keep, recompute, selective or offload (computed once).

        The one place that decides it: from the ``recompute`` mode for now; a memory-budget
        planner (``max_memory_per_device``) returns its own :class:`ActivationPlan` here. The
        executor applies it and the schedule reads its ``recompute_plan()``, so both agree.
        """
        if self._layer_actions is None and self.args.max_memory_per_device:
            self._layer_actions = _budget_activation_plan(self.args, self.grid, self.plan, self.tp_plan)
        if self._layer_actions is None:
            plan = self._layer_actions = ActivationPlan.from_mode(self.args.recompute, self.plan)
            if self.grid.rank == 0 and self.args.recompute != "none":
                logger.info("recompute=%s, layers not kept per stage: %s", self.args.recompute, ", ".join(
                    f"{len(plan.actions(s))}/{len(plan.stage_layer_names(s))}" for s in range(plan.num_stages)))
        return self._layer_actions

    def _instructions(self) -> list:
        plan = _per_rank(self._activation_plan().recompute_plan(), self.placement)
        return build_schedule(self.args.schedule, self.grid.num_stages, self.args.gradient_accumulation_steps,
                              self.grid.stage_id, plan, self.placement.num_chunks)

    def _step_batches(self) -> StepBatches:
        return StepBatches(self.train_dataset, self.data_collator, self.args.per_device_train_batch_size,
                           self.args.gradient_accumulation_steps, self.grid.dims.dp, self.grid.coord.dp,
                           self.args.seed)

    def _clip_gradients(self) -> bool:
        """Global gradient norm over every stage (tied parameters counted once); clip to
        ``max_grad_norm``. DP replicas hold identical reduced gradients, so the sum runs over
        the pipeline group, after TP-sharded gradients were summed over the tensor-parallel
        group (replicated ones, identical on every TP rank, count once)."""
        tied = self.executor.tied.values() if self.executor is not None else ()
        tied_elsewhere = set() if self.grid.is_first_stage else {id(p) for p in tied}
        sharded, sq = tp_grad_norm_squared(self.stage, exclude=tied_elsewhere)
        sq = sq.to(merak.get_device())
        if self.grid.tp_group is not None and self.grid.dims.tp > 1:
            wait_with_timeout(dist.all_reduce(sharded, group=self.grid.tp_group, async_op=True),
                              self.args.p2p_timeout, "the tensor-parallel gradient-norm all-reduce")
        sq += sharded.to(sq.device)
        if self.grid.pp_group is not None and self.grid.num_stages > 1:
            wait_with_timeout(dist.all_reduce(sq, group=self.grid.pp_group, async_op=True),
                              self.args.p2p_timeout, "the gradient-norm all-reduce")
        norm = float(sq.sqrt())
        self._last_grad_norm = norm
        if not math.isfinite(norm):
            logger.warning("non-finite gradient norm %s: skipping this optimizer step", norm)
            return False
        max_norm = self.args.max_grad_norm
        if max_norm and max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for p in self.stage.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return True

    # ---- training -----------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> TrainOutput:
        args = self.args
        batches = self._step_batches()
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(
            args.num_train_epochs * batches.steps_per_epoch)
        self.create_optimizer_and_scheduler(num_training_steps=max_steps)
        executor = self._pipeline_executor()
        instructions = self._instructions()
        self._init_state(max_steps, batches)
        start_step = 0
        if resume_from_checkpoint:
            start_step = self._resume(resume_from_checkpoint)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        total_loss, train_start = 0.0, time.perf_counter()
        for step in range(start_step, max_steps):
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            result = executor.run(instructions, batches.microbatches(step))
            loss = all_reduce_mean_loss(result.loss, self.grid, args.p2p_timeout)
            if not result.skipped:
                self.lr_scheduler.step()
            self.state.global_step = step + 1
            self.state.epoch = (step + 1) / batches.steps_per_epoch
            self.state.num_input_tokens_seen += batches.global_batch_size * self._tokens_per_sample
            window_loss, window_steps, total_loss = window_loss + loss, window_steps + 1, total_loss + loss
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_log or step + 1 == max_steps:
                self._log_window(window_loss / window_steps, window_steps,
                                 time.perf_counter() - window_start, batches)
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if self.control.should_evaluate and self.eval_dataset is not None:
                self.evaluate(ignore_keys=ignore_keys_for_eval)
            if self.control.should_save:
                self._save_checkpoint(self.stage, trial)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        steps_run = max(self.state.global_step - start_step, 1)
        runtime = time.perf_counter() - train_start
        metrics = {"train_loss": total_loss / steps_run, "train_runtime": runtime,
                   "train_samples_per_second": steps_run * batches.global_batch_size / runtime,
                   "train_steps_per_second": steps_run / runtime,
                   "train_plan_seconds": self._plan_seconds}
        self.log({k: v for k, v in metrics.items() if k != "train_loss"})
        return TrainOutput(self.state.global_step, total_loss / steps_run, metrics)

    def _init_state(self, max_steps: int, batches: StepBatches) -> None:
        from transformers.trainer_callback import TrainerState

        self.state = TrainerState(
            stateful_callbacks=[cb for cb in self.callback_handler.callbacks
                                if hasattr(cb, "state") and callable(getattr(cb, "state"))])
        self.state.max_steps = max_steps
        self.state.train_batch_size = batches.global_batch_size
        self.state.num_train_epochs = math.ceil(max_steps / batches.steps_per_epoch)
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(self.args, name)
            if value is not None and value < 1:  # HF: a float < 1 is a fraction of max_steps
                value = math.ceil(max_steps * value)
            setattr(self.state, name, value)
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()

    def _log_window(self, mean_loss: float, steps: int, seconds: float, batches: StepBatches) -> None:
        """Per logging step: loss, learning rate, grad norm, tokens/s, model TFLOP/s per device,
        peak memory — the figures a user compares between layouts."""
        samples = batches.global_batch_size * steps
        logs: dict[str, float] = {"loss": round(mean_loss, 6), "learning_rate": self._get_learning_rate()}
        if self._last_grad_norm is not None:
            logs["grad_norm"] = self._last_grad_norm
        logs["tokens_per_second"] = samples * self._tokens_per_sample / max(seconds, 1e-9)
        # Model FLOPs (forward ×3 for forward+backward), excluding recomputation: the usual MFU convention.
        flops = 3 * self._flops_per_microbatch / self.args.per_device_train_batch_size * samples
        logs["tflops_per_device"] = flops / max(seconds, 1e-9) / self.grid.dims.world_size / 1e12
        logs["peak_memory_mb"] = _peak_memory_mb()
        if self.precision.scaler is not None:
            logs["loss_scale"] = self.precision.scaler.scale
            logs["skipped_steps"] = self.precision.scaler.skipped_steps
        self.log(logs)

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("MerakTrainer runs whole pipeline steps in train(); training_step "
                                  "per micro-batch does not exist under pipeline parallelism")

    # ---- evaluation ---------------------------------------------------------------------
    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Pipelined forward over the evaluation set; returns ``{prefix}_loss`` (global mean)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (in the constructor or as argument)")
        executor = self._pipeline_executor()
        start = time.perf_counter()
        mbs = eval_microbatches(dataset, self.data_collator, self.args.per_device_eval_batch_size,
                                self.grid.dims.dp, self.grid.coord.dp)
        chunk = max(self.args.gradient_accumulation_steps, 1)
        total = torch.zeros(2, dtype=torch.float64)  # (sum of micro-batch losses, count)
        self.stage.eval()
        with torch.no_grad():
            for i in range(0, len(mbs), chunk):
                part = mbs[i:i + chunk]
                result = executor.run(forward_only.build(self.grid.num_stages, len(part),
                                                         self.grid.stage_id, self.placement), part)
                if result.loss is not None:
                    total += torch.tensor([result.loss * len(part), len(part)], dtype=torch.float64)
        self.stage.train()
        if dist.is_initialized() and dist.get_world_size() > 1:
            wait_with_timeout(dist.all_reduce(total, async_op=True), self.args.p2p_timeout,
                              "the evaluation-loss all-reduce")
        metrics = {f"{metric_key_prefix}_loss": float(total[0] / total[1]) if total[1] else float("nan"),
                   f"{metric_key_prefix}_runtime": time.perf_counter() - start}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- checkpoints and export ----------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial: Any, metrics: Any = None) -> None:
        from merak.checkpoint import save_checkpoint

        directory = f"{self.args.output_dir}/checkpoint-{self.state.global_step}"
        save_checkpoint(directory, stage=self.stage, grid=self.grid, optimizer=self.optimizer,
                        lr_scheduler=self.lr_scheduler,
                        extra={"global_step": self.state.global_step, **self._scaler_state()})
        if self.grid.rank == 0:
            self.state.save_to_json(f"{directory}/trainer_state.json")
        _barrier(self.args.p2p_timeout)

    def _resume(self, checkpoint: str | bool) -> int:
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import get_last_checkpoint

        from merak.checkpoint import load_checkpoint

        directory = get_last_checkpoint(self.args.output_dir) if checkpoint is True else checkpoint
        if directory is None:
            raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} has no checkpoint-*")
        extra = load_checkpoint(directory, stage=self.stage, grid=self.grid, optimizer=self.optimizer,
                                lr_scheduler=self.lr_scheduler)
        saved = TrainerState.load_from_json(f"{directory}/trainer_state.json")
        self.state.log_history = saved.log_history
        self.state.global_step = int(extra["global_step"])
        if self.precision.scaler is not None and "loss_scaler" in extra:
            self.precision.scaler.load_state_dict(extra["loss_scaler"])
        self.state.num_input_tokens_seen = saved.num_input_tokens_seen
        return self.state.global_step

    def _scaler_state(self) -> dict[str, Any]:
        scaler = self.precision.scaler
        return {} if scaler is None else {"loss_scaler": scaler.state_dict()}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Collective: write a consolidated ``save_pretrained`` directory from any layout."""
        from merak.checkpoint import export_pretrained

        export_pretrained(output_dir or self.args.output_dir, stage=self.stage, grid=self.grid,
                          model=self.original_model)


# ---- helpers ------------------------------------------------------------------------------
#: What does not work with several model chunks per rank yet, and the argument that asks for it.
_NOT_WITH_CHUNKS = {
    "load_weights_from": "loading pretrained weights into model chunks",
    "partition_calibration_rounds": "calibrating the partition (it times one stage per rank)",
    "max_memory_per_device": "the memory-budget planner (it sizes one stage per rank)",
}


def _placement(args: MerakArguments, grid: Any) -> Placement:
    """Which rank holds which model chunk under ``args.schedule``; refuses, naming the argument,
    what virtual stages do not support yet."""
    placement = placement_for(args.schedule, grid.num_stages,
                              args.chunks_per_stage if args.schedule == "interleaved_1f1b" else None)
    if placement.num_chunks == 1:
        return placement
    for name, what in _NOT_WITH_CHUNKS.items():
        if getattr(args, name):
            raise ValueError(f"schedule={args.schedule!r} runs {placement.num_chunks} model chunks per rank, which "
                             f"does not support {what} yet: unset {name} or use a schedule without virtual "
                             f"stages (1f1b, zero_bubble, ...)")
    if grid.dims.tp > 1:
        raise ValueError(f"schedule={args.schedule!r} (virtual stages) does not support tensor parallelism yet; "
                         f"use tp=1 or a schedule without virtual stages")
    if args.recompute == "stage_aware":
        raise ValueError(f"recompute='stage_aware' sizes recomputation for 1F1B's uneven in-flight counts; "
                         f"schedule={args.schedule!r} keeps the same count on every rank: use 'full' or 'selective'")
    return placement


def _per_rank(plan: RecomputePlan, placement: Placement) -> RecomputePlan:
    """The schedules' recompute plan (one fraction per rank) from one per virtual stage: a
    rank drops the mean share of its chunks (each chunk weighs ``1/v`` of the rank)."""
    if placement.num_chunks == 1:
        return plan
    return RecomputePlan(tuple(
        sum(plan.fraction(k) for k in placement.chunks_of(r)) / placement.num_chunks
        for r in range(placement.num_ranks)))


def _partition_cost_model(args: MerakArguments, graph: Any, example: Mapping[str, Any]) -> Any:
    """``None`` (the partitioner's FLOP roofline) or, with ``partition_cost_model="profile"``,
    node times measured on this device and averaged over all ranks so every stage cuts alike."""
    if args.partition_cost_model != "profile":
        return None
    from merak.partitioner.profiler import profile_costs

    measured = profile_costs(graph, example, device=merak.get_device())
    return measured.averaged(timeout_s=args.p2p_timeout)


def _calibrate(plan: Any, grid: Any, args: MerakArguments, example: Mapping[str, Any],
               loss_fn: LossFn | None) -> Any:
    """``plan`` re-cut on its stage times measured in dry 1F1B steps of the pipeline
    (:mod:`merak.runtime.pipeline.calibration`; M copies of the example micro-batch); the times
    are gathered on every rank, so all ranks keep the same cut."""
    from merak.runtime.pipeline.calibration import calibrate_in_pipeline

    microbatches = [example] * max(args.gradient_accumulation_steps, grid.num_stages)
    return calibrate_in_pipeline(plan, grid, microbatches, rounds=args.partition_calibration_rounds,
                                 device=merak.get_device(), loss_fn=loss_fn, seed=args.seed,
                                 fuse=args.fuse_ops, timeout_s=args.p2p_timeout)


def _budget_activation_plan(args: MerakArguments, grid: Any, plan: Any, tp_plan: Any) -> ActivationPlan:
    """The per-layer plan that fits ``max_memory_per_device`` on every stage (the estimator and
    planner of :mod:`merak.runtime.memory.planner`; deterministic, so every rank computes the same
    plan, or raises the same ``MemoryBudgetError``). Rank 0 logs the per-stage estimate."""
    from merak.runtime.memory.estimator import Layout, MemoryModel, memory_table, parse_bytes
    from merak.runtime.memory.planner import plan_activations

    budget = parse_bytes(args.max_memory_per_device)
    memory = MemoryModel(plan, Layout.from_training_args(args, grid.dims.dp, grid.dims.tp, grid.dims.pp), tp_plan)
    actions = plan_activations(plan, memory.layout, args.recompute, budget, offload=args.activation_offload,
                               memory=memory)
    if grid.rank == 0:
        logger.info("memory per device (estimate, recompute=%s%s):\n%s", args.recompute,
                    " + offload" if args.activation_offload else "", memory_table(memory.estimate(actions), budget))
    return actions


def _mixed_precision(args: MerakArguments, grid: Any) -> MixedPrecision:
    """bf16 / fp16 autocast over fp32 master weights (HF's own amp never runs: Merak's executor
    runs the steps). ``zero_stage=1`` with one DP replica has nothing to shard: say so."""
    if args.zero_stage == 1 and grid.dims.dp == 1 and grid.rank == 0:
        logger.warning("zero_stage=1 has no effect with dp=1: optimizer states are sharded over data-parallel "
                       "replicas only")
    precision = MixedPrecision.from_flags(
        bf16=args.bf16, fp16=args.fp16, scale=args.fp16_initial_loss_scale,
        growth_interval=args.fp16_loss_scale_window, min_scale=args.fp16_min_loss_scale)
    if precision.dtype is not None and grid.rank == 0:
        logger.info("mixed precision: %s compute, fp32 master weights%s", precision.name,
                    ", dynamic loss scaling" if precision.scaler else "")
    return precision


def _apply_auto_parallel(model: nn.Module, args: MerakArguments, collate: Callable[[list[Any]], dict[str, Any]],
                         dataset: Any) -> None:
    """Pick the layout with the simulator (rank 0 decides, every rank follows), build the grid
    and rewrite the arguments it decides (see :mod:`merak.auto_parallel`)."""
    from merak.auto_parallel import decide_on_rank0

    if merak.initialize.is_initialized():
        raise ValueError("auto_parallel=True chooses dp, tp and pp itself, but merak.init(...) was already "
                         "called; remove that call, or set auto_parallel=False to keep your layout")
    if dataset is None:
        raise ValueError("MerakTrainer needs a train_dataset or eval_dataset to plan auto_parallel with")
    merak.initialize.join_job(timeout_s=args.p2p_timeout)
    example = collate([dataset[i] for i in range(min(len(dataset), args.per_device_train_batch_size))])
    graph = trace(model, {k: meta_like(v) for k, v in example.items()}, leaf_modules=args.leaf_modules)
    choice = decide_on_rank0(graph, example, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                             args.max_memory_per_device, args.p2p_timeout)
    grid = merak.init(dp=choice.dp, tp=choice.tp, pp=choice.pp, timeout_s=args.p2p_timeout)
    args.per_device_train_batch_size = choice.micro_batch
    args.gradient_accumulation_steps = choice.num_microbatches
    args.schedule, args.recompute = choice.schedule, choice.recompute
    args.tp_sub_microbatches = choice.tp_sub_microbatches
    if grid.rank == 0:
        logger.info("auto_parallel chose dp=%d tp=%d pp=%d, micro-batch %d x %d, %s, recompute=%s, "
                    "tp_sub_microbatches=%d (predicted %.3fs/step, %.2f GiB peak, MFU %.1f%%); best layouts:\n%s",
                    choice.dp, choice.tp, choice.pp, choice.micro_batch, choice.num_microbatches, choice.schedule,
                    choice.recompute, choice.tp_sub_microbatches, choice.step_seconds,
                    choice.peak_memory_bytes / 2**30, choice.mfu * 100, choice.table)


def _grid() -> Any:
    try:
        return merak.get_grid()
    except RuntimeError:  # no merak.init: pure data parallelism over whatever the launcher started
        return merak.init(dp=read_launch_env().world_size)


def _barrier(timeout_s: float) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        wait_with_timeout(dist.barrier(async_op=True), timeout_s, "a barrier after saving a checkpoint")


def _tokens_per_sample(example: Mapping[str, Any]) -> int:
    ids = example.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
        return int(ids.shape[1])
    return 1


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _check_batch_against_model(model: nn.Module, batch: Mapping[str, Any]) -> None:
    """Fail early, with the fix, on data that cannot feed the model (before any tracing)."""
    params = inspect.signature(model.forward).parameters
    named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    # Checked even when forward takes **kwargs (HF models do): a stray column would otherwise
    # reach the model as an unexpected keyword, or fail deep inside tracing.
    unknown = [k for k in batch if k not in named]
    if unknown:
        raise ValueError(f"the dataset yields keys {unknown} that {type(model).__name__}.forward does "
                         f"not take (its inputs: {named}); rename or drop those columns")
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [n for n in required if n not in batch]
    if missing:
        raise ValueError(f"{type(model).__name__}.forward requires {missing} but the dataset yields only "
                         f"{sorted(batch)}; add those keys in the dataset or data_collator")
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    ids = batch.get("input_ids")
    if limit and isinstance(ids, torch.Tensor) and ids.dim() >= 2 and ids.shape[1] > limit:
        raise ValueError(f"sequences of length {ids.shape[1]} exceed the model's {limit} positions; "
                         f"truncate/chunk the data to <= {limit} tokens or raise the config's limit")
