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
import os
import resource
import time
from typing import Any, Callable, Mapping

import torch
import transformers.trainer
import transformers.trainer_pt_utils
from torch import nn
from transformers import Trainer, default_data_collator
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import TrainOutput

import merak
from merak.arguments import MerakArguments
from merak.data import EvalLoader, StepBatches, StreamLoader, TrainLoader
from merak.hf_fields import check_training_arguments
from merak.launch.env import read_launch_env
from merak.partitioner import StageChunks, build_chunks, build_stage, shard, trace
from merak.partitioner.meta import meta_like
from merak.runtime.pipeline.executor import LossFn, PipelineExecutor, all_reduce_mean_loss
from merak.runtime.tensor_parallel import apply_tensor_parallel, plan_tensor_parallel, tp_grad_norm_squared
from merak.runtime.distributed import collectives
from merak.runtime.distributed.routed import routed
from merak.runtime.memory.precision import MixedPrecision
from merak.runtime.memory.zero import shard_optimizer_states
from merak.runtime.memory.policy import ActivationPlan
from merak.runtime.memory.recompute_plan import RecomputePlan
from merak.runtime.pipeline.placement import Placement
from merak.runtime.pipeline.schedule import build as build_schedule, placement_for, uses_weight_passes

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
        check_training_arguments(args)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func=(outputs, labels, num_items_in_batch) is not supported; pass "
                             "loss_fn=(outputs, batch) -> per-micro-batch mean loss to MerakTrainer instead")
        if kwargs.get("model_init") is not None:
            raise ValueError("model_init is not supported (the model is partitioned once, at construction); "
                             "pass the model itself")
        collate = data_collator or _default_collator(kwargs.get("processing_class"))
        train_dataset = _drop_unused_columns(train_dataset, model, args)
        eval_dataset = _drop_unused_columns(eval_dataset, model, args)
        if args.auto_parallel:
            _apply_auto_parallel(model, args, collate, train_dataset if train_dataset is not None else eval_dataset)
        self.grid = _grid()
        self.original_model = model
        self.loss_fn = loss_fn
        dataset = train_dataset if train_dataset is not None else eval_dataset
        if dataset is None:
            raise ValueError("MerakTrainer needs a train_dataset or eval_dataset: the model is traced "
                             "with one collated micro-batch of it")
        example = collate(_first_samples(dataset, args.per_device_train_batch_size))
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
            calibration = _calibrate(self.plan, self.grid, args, example, loss_fn, self.placement)
            self.plan = calibration.plan
            if self.grid.rank == 0:
                logger.info("%s", calibration.table())
        if args.tp_sub_microbatches > 1 and self.grid.dims.tp == 1:
            logger.warning("tp_sub_microbatches=%d has no effect without tensor parallelism (tp=1)",
                           args.tp_sub_microbatches)
        if self.grid.dims.tp > 1 and args.per_device_train_batch_size % args.tp_sub_microbatches:
            raise ValueError(f"per_device_train_batch_size={args.per_device_train_batch_size} cannot be split "
                             f"into tp_sub_microbatches={args.tp_sub_microbatches} equal parts; use a multiple of "
                             f"{args.tp_sub_microbatches} (or tp_sub_microbatches=1)")
        self._graph = graph
        stage = self._build_local_stage(args)
        self._plan_seconds = time.perf_counter() - start
        self._tokens_per_sample = _tokens_per_sample(example)
        self._flops_per_microbatch = float(sum(s.flops for s in self.plan.stages))
        if self.grid.rank == 0:
            logger.info("Merak %s, partition plan (%.1fs):\n%s", self.grid.dims, self._plan_seconds,
                        self.plan.table())
        self.executor: PipelineExecutor | None = None
        self._layer_actions: ActivationPlan | None = None
        self._last_grad_norm: float | None = None
        self._non_embedding_params: int | None = None
        self._merak_window_start, self._merak_last_logged_step = time.perf_counter(), 0
        self._substeps_pending = self._optimizer_events = 0
        self.precision = _mixed_precision(args, self.grid)
        super().__init__(model=stage, args=args, data_collator=collate, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, **kwargs)
        self._introspect(model)
        if args.max_memory_per_device:
            self._activation_plan()  # an infeasible budget is refused here, identically on every rank

    def _build_local_stage(self, args: MerakArguments) -> nn.Module:
        """This rank's stage (or model chunks) of ``self.plan``: built, pretrained weights loaded,
        tensor parallelism applied. Called at construction and again when a resumed checkpoint
        was cut elsewhere (:meth:`_adopt_checkpoint_cuts`)."""
        model = self.original_model
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
        if self.grid.dims.tp > 1:
            self.tp_plan = plan_tensor_parallel(self._graph, self.grid.dims.tp, args.tp_mapping, args.moe_parallel)
            apply_tensor_parallel(stage, self.grid, self.tp_plan, args.tp_sub_microbatches, args.p2p_timeout,
                                  seed=args.seed)
            if self.grid.rank == 0:
                logger.info("%s", self.tp_plan.table())
        if hasattr(model, "config"):
            stage.config = model.config  # HF code paths (saving, logging) look for it
        return stage

    def _adopt_checkpoint_cuts(self, directory: str) -> None:
        """Resume rebuilds the checkpoint's stages: with ``partition_cost_model="profile"``,
        calibration or ``auto_parallel`` this run's measurements may have cut elsewhere. Every
        rank reads the same ``extra.json``, so all rebuild alike (before the optimizer exists)."""
        import json

        path = os.path.join(directory, "extra.json")
        saved = json.load(open(path)).get("partition_cuts") if os.path.exists(path) else None
        if saved is None or list(saved) == self._cuts():
            return
        if len(saved) != len(self._cuts()):
            return  # another stage count: the checkpoint reshards by tensor name onto this plan
        if self.optimizer is not None:
            raise ValueError(f"checkpoint {directory} was cut at {saved} but this run's plan cuts at {self._cuts()}, "
                             f"and the optimizer passed to MerakTrainer holds the other stage's parameters; let "
                             f"MerakTrainer create the optimizer, or resume with partition_cuts={list(saved)}")
        if self.grid.rank == 0:
            logger.info("checkpoint %s was cut at %s (this run's plan: %s): rebuilding the stages at its cuts",
                        directory, saved, self._cuts())
        self.plan = shard(self._graph, self.placement.num_virtual, method="manual", manual_cuts=list(saved))
        self.model = self.model_wrapped = self._build_local_stage(self.args)
        self.executor, self._layer_actions = None, None
        self._flops_per_microbatch = float(sum(s.flops for s in self.plan.stages))

    def _introspect(self, model: nn.Module) -> None:
        """What HF's ``__init__`` reads from the model, read from the user's model rather than the
        stage: loss kwargs (token-normalised loss), label names, label shifting, label smoothing
        (a loss on the last stage's logits, through HF's ``LabelSmoother``)."""
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        from transformers.utils.generic import can_return_loss, find_labels

        if hasattr(model, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = model.accepts_loss_kwargs
        else:
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in
                                                 inspect.signature(model.forward).parameters.values())
        self.label_names = find_labels(type(model)) if self.args.label_names is None else self.args.label_names
        self.can_return_loss = can_return_loss(type(model))
        config = getattr(model, "config", None)
        self._loss_shifts_labels = (LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
                                    and not getattr(config, "is_encoder_decoder", False))
        self._token_weighted = self.model_accepts_loss_kwargs and self.loss_fn is None
        # HF hands num_items_in_batch to a model taking **kwargs and then skips its division by the
        # number of micro-batches; a model whose loss ignores it (BERT classifiers, T5) is thereby
        # trained on the *sum* of its micro-batch losses. Reproduce that, too.
        self._loss_sums_microbatches = self._token_weighted and not _loss_reads_num_items(model)
        if self.label_smoother is not None and self.loss_fn is None:
            smoother = self.label_smoother
            shift = type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()

            def smoothed(outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> torch.Tensor:
                return smoother({"logits": outputs["logits"]}, batch["labels"], shift_labels=shift)

            self.loss_fn = smoothed
            self._token_weighted = self.model_accepts_loss_kwargs
            self._loss_sums_microbatches = False  # HF's LabelSmoother reads num_items_in_batch

    def _without_unused_columns(self, dataset: Any) -> Any:
        return _drop_unused_columns(dataset, self.original_model, self.args)

    # ---- the pipeline pieces --------------------------------------------------------------
    @property
    def stage(self) -> nn.Module:
        return self.model

    @property
    def computes_loss(self) -> bool:
        """Whether this rank holds the model's last (virtual) stage: the pipeline's last rank,
        or rank 0 under the V placement of zb_v / dualpipe_v."""
        return self.placement.locate(self.placement.num_virtual - 1)[0] == self.grid.stage_id

    def _pipeline_executor(self) -> PipelineExecutor:
        """The trainer's one executor, created on first use: it registers gradient hooks on the
        stage's parameters (and patches layers for zero-bubble), which must happen only once.
        ``train`` hands it the optimizer, which may not exist yet when ``evaluate`` runs first."""
        if self.executor is None:
            chunks = list(self.stage.chunks) if isinstance(self.stage, StageChunks) else self.stage
            self.executor = PipelineExecutor(
                chunks, self.grid, None, device=merak.get_device(), loss_fn=self.loss_fn,
                timeout_s=self.args.p2p_timeout, zero_bubble=uses_weight_passes(self.args.schedule),
                before_optimizer_step=self._before_optimizer_step, after_optimizer_step=self._after_optimizer_step,
                precision=self.precision, activation_plan=self._activation_plan(), placement=self.placement,
                bucket_bytes=int((self.args.ddp_bucket_cap_mb or 25) * 2**20),
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
            plan = self._layer_actions = _mode_activation_plan(self.args, self.plan, self.placement)
            if self.grid.rank == 0 and self.args.recompute != "none":
                logger.info("recompute=%s, layers not kept per stage: %s", self.args.recompute, ", ".join(
                    f"{len(plan.actions(s))}/{len(plan.stage_layer_names(s))}" for s in range(plan.num_stages)))
        return self._layer_actions

    def _instructions(self) -> list:
        plan = RecomputePlan.from_virtual_stages(self._activation_plan().recompute_plan(), self.placement,
                                                 self._activation_budget())
        return build_schedule(self.args.schedule, self.grid.num_stages, self.args.gradient_accumulation_steps,
                              self.grid.stage_id, plan, self.placement.num_chunks)

    def _activation_budget(self) -> float | None:
        """The activation peak the stage-aware rule sized a virtual-stage plan for (``None``
        otherwise: the schedules then default to 1F1B's peak with the same plan)."""
        if not _stage_aware_per_chunk(self.args, self.placement):
            return None
        from merak.runtime.memory.stage_aware import stage_aware_target

        return stage_aware_target(self.placement.num_ranks, self.args.gradient_accumulation_steps)

    def _step_batches(self) -> StepBatches:
        args = self.args
        return StepBatches(self.train_dataset, self.data_collator, args.per_device_train_batch_size,
                           args.gradient_accumulation_steps, self.grid.dims.dp, self.grid.coord.dp,
                           args.data_seed if args.data_seed is not None else args.seed,
                           shuffle=str(getattr(args.train_sampling_strategy, "value", args.train_sampling_strategy))
                           != "sequential")

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
            collectives.all_reduce(sharded, "the tensor-parallel gradient-norm all-reduce",
                                   group=self.grid.tp_group, timeout_s=self.args.p2p_timeout)
        sq += sharded.to(sq.device)
        if self.grid.pp_group is not None and self.grid.num_stages > 1:
            collectives.all_reduce(sq, "the gradient-norm all-reduce", group=self.grid.pp_group,
                                   timeout_s=self.args.p2p_timeout)
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

    # ---- training: HF's loop, a pipeline step where HF runs one -----------------------
    def get_train_dataloader(self) -> TrainLoader | StreamLoader:
        """Layout-invariant step batches (:class:`~merak.data.StepBatches`) behind the dataloader
        interface HF's loop sizes epochs with."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if _is_stream(self.train_dataset):
            args, grid = self.args, self.grid
            return StreamLoader(self.train_dataset, self.data_collator, args.per_device_train_batch_size,
                                args.gradient_accumulation_steps, grid.dims.dp, grid.coord.dp)
        return TrainLoader(self._step_batches())

    def get_total_train_batch_size(self, args: Any) -> int:
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * self.grid.dims.dp

    def get_tp_size(self) -> int:
        return self.grid.dims.tp

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        """HF's ``train``; ``resume_from_checkpoint=True`` picks the last *complete* checkpoint of
        ``output_dir`` (HF would take the highest-numbered directory, which a save interrupted by
        a crash may have left half-written)."""
        if resume_from_checkpoint is True:
            from merak.checkpoint import last_complete_checkpoint

            found = last_complete_checkpoint(self.args.output_dir, also=(TRAINER_STATE_NAME,))
            if found is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            if self.grid.rank == 0:
                logger.info("resuming from the last complete checkpoint %s", found)
            resume_from_checkpoint = found
        with self._hf_collectives_bounded():
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._finish_pending_save()  # after an error it is simply not published
        return output

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """HF's ``evaluate``, its own ``torch.distributed`` calls bounded (see ``_hf_collectives_bounded``)."""
        with self._hf_collectives_bounded():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """HF's ``predict``, its own ``torch.distributed`` calls bounded (see ``_hf_collectives_bounded``)."""
        with self._hf_collectives_bounded():
            return super().predict(*args, **kwargs)

    def _hf_collectives_bounded(self) -> Any:
        """While HF's Trainer code runs, its direct ``torch.distributed`` calls (the barrier in
        ``_save_checkpoint``, ``store_flos``' all-gather) go through Merak's distributed layer:
        bounded by ``p2p_timeout`` and naming rank, group and the HF function on a stuck peer."""
        return routed(transformers.trainer, transformers.trainer_pt_utils, owner="transformers' Trainer",
                      timeout_s=self.args.p2p_timeout)

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None
                              ) -> tuple[nn.Module, Any]:
        """HF's optimizer and scheduler over the local stage, no Accelerate wrapping (the executor
        reduces gradients itself); a resumed run restores Merak's shards here, once the optimizer
        exists (weights, optimizer, scheduler, RNG, loss scale)."""
        if self._created_lr_scheduler:
            self.lr_scheduler, self._created_lr_scheduler = None, False
        if resume_from_checkpoint is not None:
            self._adopt_checkpoint_cuts(resume_from_checkpoint)
        self.create_optimizer()
        self.create_scheduler(num_training_steps=max_steps)
        self.model_wrapped = self.stage
        self._pipeline_executor()
        if resume_from_checkpoint is not None:
            self._restore_checkpoint(resume_from_checkpoint)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return self.stage, train_dataloader

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Nothing yet: Merak's shards are restored with the optimizer in ``_prepare_for_training``."""

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Nothing: every rank's RNG came back with its shard (HF restores it per epoch)."""

    def _run_epoch(self, model: nn.Module, epoch: int, train_dataloader: TrainLoader, steps_in_epoch: int,
                   num_update_steps_per_epoch: int, trial: Any, ignore_keys_for_eval: list[str] | None,
                   start_time: float, resume_from_checkpoint: str | None, epochs_trained: int,
                   steps_trained_in_current_epoch: int) -> None:
        """HF's ``_run_epoch`` with one pipeline schedule per optimizer step: the same events in the
        same order (``on_substep_end`` per micro-batch but the last, ``on_pre_optimizer_step`` /
        ``on_optimizer_step`` around the step), the same loss bookkeeping and
        ``_maybe_log_save_evaluate``; data step ``k`` of an epoch is global batch
        ``epoch * steps_per_epoch + k``."""
        args = self.args
        first = 0
        if epoch == epochs_trained and resume_from_checkpoint is not None and not args.ignore_data_skip:
            first = steps_trained_in_current_epoch // args.gradient_accumulation_steps
        executor = self._pipeline_executor()
        instructions = self._instructions()
        grad_norm: float | None = None
        learning_rate: float | None = None
        ran = False
        for update_step in range(first, num_update_steps_per_epoch):
            microbatches = train_dataloader.step_of(epoch, update_step)
            if microbatches is None:  # a stream ran out: the epoch ends (HF's loop starts the next one)
                break
            ran = True
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            weights, tokens = self._loss_weights(microbatches)
            self._substeps_pending = len(microbatches) - 1
            self._optimizer_events = 0
            result = executor.run(instructions, microbatches, loss_weights=weights)
            self._finish_step_events()
            loss = torch.tensor(all_reduce_mean_loss(result.loss, self.grid, args.p2p_timeout), device=args.device)
            if args.logging_nan_inf_filter and not torch.isfinite(loss):
                self._tr_loss += self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)
            else:
                self._tr_loss += loss
            self._count_flos_and_tokens(microbatches, tokens)
            grad_norm = self._last_grad_norm
            learning_rate = self._get_learning_rate()
            if not result.skipped and not isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.lr_scheduler.step()
            self.state.global_step += 1
            self.state.epoch = epoch + (update_step + 1) * args.gradient_accumulation_steps / steps_in_epoch
            if args.torch_empty_cache_steps and self.state.global_step % args.torch_empty_cache_steps == 0 \
                    and torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            self._maybe_log_save_evaluate(self._tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                          start_time, learning_rate=learning_rate)
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break
        if not ran and first == 0:
            logger.warning("an epoch without a single step: stopping training at step %d", self.state.global_step)
            self.control.should_training_stop = True
        self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
        self._maybe_log_save_evaluate(self._tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                      start_time, learning_rate=learning_rate)

    def _before_optimizer_step(self) -> bool:
        """Executor hook after the gradient reductions: clip (global norm), then HF's events."""
        ok = self._clip_gradients()
        self._finish_substeps()
        self._optimizer_events = 1
        self.control = self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)
        return ok

    def _after_optimizer_step(self) -> None:
        self._optimizer_events = 2
        self.control = self.callback_handler.on_optimizer_step(self.args, self.state, self.control)

    def _finish_substeps(self) -> None:
        for _ in range(getattr(self, "_substeps_pending", 0)):
            self.control = self.callback_handler.on_substep_end(self.args, self.state, self.control)
        self._substeps_pending = 0

    def _finish_step_events(self) -> None:
        """A step the executor skipped (fp16 overflow, non-finite norm) still shows HF's events."""
        self._finish_substeps()
        if self._optimizer_events == 0:
            self.control = self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)
        if self._optimizer_events < 2:
            self.control = self.callback_handler.on_optimizer_step(self.args, self.state, self.control)

    def _loss_weights(self, microbatches: list[dict[str, Any]]) -> tuple[list[float] | None, int]:
        """Per micro-batch loss weights, as HF normalises with ``num_items_in_batch``.

        When HF would pass ``num_items_in_batch`` (the model takes ``**kwargs`` and the batch has
        labels), the model's own loss is the mean over one micro-batch's ``n_i`` label tokens, so
        weighting it by ``n_i / N`` (``N`` the step's label tokens over all DP replicas when
        ``average_tokens_across_devices``; times ``dp`` since DP averages gradients) makes the
        step's loss and gradient HF's token-weighted ones. If that model's loss ignores
        ``num_items_in_batch``, HF still skips its division by the number of micro-batches: each
        weighs ``1`` (``dp`` with ``average_tokens_across_devices``, as HF scales by the world
        size). Otherwise ``None``: HF's plain mean over micro-batches. Also returns the step's input tokens for ``num_input_tokens_seen``.
        """
        counts = [self._num_items(mb) for mb in microbatches]
        tokens = sum(self._input_tokens(mb) for mb in microbatches)
        dp = self.grid.dims.dp
        if any(c is None for c in counts) or not self._token_weighted:
            if dp > 1 and self.args.include_num_input_tokens_seen != "no":
                tokens = int(self._dp_sum([0, tokens])[1])
            return None, tokens
        total, scale = float(sum(counts)), 1.0
        if dp > 1:
            summed = self._dp_sum([total, tokens])
            tokens = int(summed[1])
            if self.args.average_tokens_across_devices:
                total, scale = float(summed[0]), float(dp)
        if self._loss_sums_microbatches:
            return [scale] * len(counts), tokens
        if total == 0:
            return [0.0] * len(counts), tokens
        return [c * scale / total for c in counts], tokens

    def _dp_sum(self, values: list[float]) -> list[float]:
        return collectives.reduce_values(values, "the label-token count all-reduce over data-parallel replicas",
                                         group=self.grid.dp_group, timeout_s=self.args.p2p_timeout)

    def _num_items(self, mb: Mapping[str, Any]) -> int | None:
        """HF's ``_get_num_items_in_batch`` for one micro-batch (labels shifted for causal LMs)."""
        labels = mb.get("shift_labels", mb.get("labels"))
        if not isinstance(labels, torch.Tensor):
            return None
        if "shift_labels" not in mb and self._loss_shifts_labels:
            labels = labels[..., 1:]
        return int(labels.ne(-100).sum())

    def _input_tokens(self, mb: Mapping[str, Any]) -> int:
        if self.args.include_num_input_tokens_seen == "no":
            return 0
        ids = mb.get(getattr(self.original_model, "main_input_name", "input_ids"))
        if not isinstance(ids, torch.Tensor):
            return 0
        if self.args.include_num_input_tokens_seen == "non_padding" and "attention_mask" in mb:
            return int(mb["attention_mask"].sum())
        return ids.numel()

    def _count_flos_and_tokens(self, microbatches: list[dict[str, Any]], tokens: int) -> None:
        """HF's ``current_flos`` (6 x tokens x non-embedding parameters), counted once per replica
        (first stage, tp rank 0) since ``store_flos`` sums over all ranks; tokens seen likewise."""
        self.state.num_input_tokens_seen += tokens
        if self.grid.is_first_stage and self.grid.coord.tp == 0:
            self.current_flos += float(sum(self.floating_point_ops(mb) for mb in microbatches))

    def floating_point_ops(self, inputs: dict[str, torch.Tensor | Any]) -> int:
        main = getattr(self.original_model, "main_input_name", "input_ids")
        if main in inputs and hasattr(self.original_model, "num_parameters"):
            if self._non_embedding_params is None:
                self._non_embedding_params = self.original_model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main].numel() * self._non_embedding_params
        return 0

    def store_flos(self) -> None:
        """HF's: a sum over all ranks, of a float on every rank (ranks that count none hold 0.0;
        an int there would mismatch the collective's dtype)."""
        self.current_flos = float(self.current_flos)
        super().store_flos()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """HF's ``log``; a training log (it has ``loss``) also gets Merak's throughput figures."""
        if "loss" in logs and "eval_loss" not in logs:
            now = time.perf_counter()
            steps = self.state.global_step - self._merak_last_logged_step
            if steps > 0:
                self._add_throughput(logs, steps, now - self._merak_window_start)
            self._merak_window_start, self._merak_last_logged_step = now, self.state.global_step
        super().log(logs, start_time)

    def _add_throughput(self, logs: dict[str, float], steps: int, seconds: float) -> None:
        """Per logging step: tokens/s, model TFLOP/s per device, peak memory, loss scale - the
        figures a user compares between layouts. Logged by the ``merak`` logger (rank 0); added
        to ``log_history`` only with ``log_throughput=True``, so that it keeps HF's keys."""
        samples = self.get_total_train_batch_size(self.args) * steps
        figures: dict[str, float] = {"tokens_per_second": samples * self._tokens_per_sample / max(seconds, 1e-9)}
        # Model FLOPs (forward x3 for forward+backward), excluding recomputation: the usual MFU convention.
        flops = 3 * self._flops_per_microbatch / self.args.per_device_train_batch_size * samples
        figures["tflops_per_device"] = flops / max(seconds, 1e-9) / self.grid.dims.world_size / 1e12
        figures["peak_memory_mb"] = _peak_memory_mb()
        if self.precision.scaler is not None:
            figures["loss_scale"] = self.precision.scaler.scale
            figures["skipped_steps"] = self.precision.scaler.skipped_steps
        if self.args.log_throughput:
            logs.update(figures)
        if self.grid.rank == 0:
            logger.info("step %d: %s", self.state.global_step,
                        ", ".join(f"{k}={v:.4g}" for k, v in figures.items()))

    def _finalize_training(self, trial: Any, num_train_samples: int, start_time: float) -> TrainOutput:
        """HF's, after the last background save is published: HF's end-of-training cleanup
        (``save_total_limit=1`` with a best checkpoint) deletes checkpoints and must not meet
        one still being written."""
        if self.grid.rank == 0:
            logger.info("partitioning took %.2fs", self._plan_seconds)
        self._finish_pending_save()
        return super()._finalize_training(trial, num_train_samples, start_time)

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("MerakTrainer runs whole pipeline steps in _run_epoch(); training_step "
                                  "per micro-batch does not exist under pipeline parallelism")

    # ---- evaluation and prediction: HF's evaluate/predict, a pipelined loop -----------------
    def get_eval_dataloader(self, eval_dataset: Any = None) -> EvalLoader:
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        return self._eval_loader(dataset)

    def get_test_dataloader(self, test_dataset: Any) -> EvalLoader:
        return self._eval_loader(test_dataset)

    def _eval_loader(self, dataset: Any) -> EvalLoader:
        dataset = self._without_unused_columns(dataset)
        return EvalLoader(dataset, self.data_collator, self.args.per_device_eval_batch_size,
                          self.grid.dims.dp, self.grid.coord.dp)

    def evaluation_loop(self, dataloader: EvalLoader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        """HF's ``evaluation_loop`` contract (``EvalLoopOutput``, ``compute_metrics``,
        ``preprocess_logits_for_metrics``, ``batch_eval_metrics``, ``include_for_metrics``,
        ``on_prediction_step``) over forward-only pipeline passes; see :mod:`merak.evaluation`."""
        from merak.evaluation import pipelined_evaluation_loop

        return pipelined_evaluation_loop(self, dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)

    # ---- checkpoints and export ----------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Collective. Inside a checkpoint (HF's ``_save_checkpoint`` calls it first): Merak's
        shards. Otherwise: a consolidated ``save_pretrained`` directory from any layout. Either
        way rank 0 adds what HF's ``_save`` writes beside the weights: the processing class
        (tokenizer ...) and ``training_args.bin``."""
        from merak.checkpoint import export_pretrained, save_checkpoint

        directory = output_dir or self.args.output_dir
        if _internal_call and self.is_in_train:
            full = not self.args.save_only_model
            self._finish_pending_save()
            self._pending_save = save_checkpoint(
                directory, stage=self.stage, grid=self.grid, optimizer=self.optimizer if full else None,
                lr_scheduler=self.lr_scheduler if full else None, async_save=self.args.async_save,
                timeout_s=self.args.p2p_timeout,
                extra={"global_step": self.state.global_step, "partition_cuts": self._cuts(), **self._scaler_state()})
            if self._pending_save is not None and self.args.should_save:
                os.makedirs(directory, exist_ok=True)  # HF's files go there; published with Merak's part
        else:
            export_pretrained(directory, stage=self.stage, grid=self.grid, model=self.original_model)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(directory)
            torch.save(self.args, f"{directory}/{TRAINING_ARGS_NAME}")
        _barrier(self.args.p2p_timeout)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """HF's, except that with ``async_save`` the ``save_total_limit`` rotation waits until
        this checkpoint is published (:meth:`_finish_pending_save`). Rotating while it is written
        would count its directory (which holds only the trainer's files yet) as the newest
        checkpoint: ``save_total_limit=1`` would delete the last complete one, and a misordered
        modification time could delete the one being written."""
        limit = self.args.save_total_limit
        if not (self.args.async_save and limit):
            return super()._save_checkpoint(model, trial)
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self._rotate_after_publish = (self._get_output_dir(trial=trial), limit)

    def _finish_pending_save(self) -> None:
        """Collective: wait for the checkpoint being written in the background (``async_save``),
        publish it, then run the rotation its save deferred (no save is in flight then; the
        rotation still keeps the last complete checkpoint, see
        :func:`merak.checkpoint.rotate_checkpoints`)."""
        from merak.checkpoint import rotate_checkpoints

        pending, self._pending_save = getattr(self, "_pending_save", None), None
        rotation, self._rotate_after_publish = getattr(self, "_rotate_after_publish", None), None
        if pending is not None:
            pending.wait()
        if rotation is not None and self.args.should_save:
            # (the limit saved with the request: this may run inside the next _save_checkpoint,
            # which has set args.save_total_limit aside)
            run_dir, limit = rotation
            for deleted in rotate_checkpoints(run_dir, limit,
                                              best_model_checkpoint=self.state.best_model_checkpoint,
                                              also=(TRAINER_STATE_NAME,)):
                logger.info("Deleting older checkpoint [%s] due to args.save_total_limit", deleted)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The optimizer lives in Merak's shards (one per stage); HF's ``scheduler.pt`` (the same
        on every rank) is written by rank 0 beside them."""
        if self.args.should_save and self.lr_scheduler is not None:
            torch.save(self.lr_scheduler.state_dict(), f"{output_dir}/{SCHEDULER_NAME}")

    def _restore_checkpoint(self, directory: str) -> None:
        from merak.checkpoint import load_checkpoint

        full = os.path.exists(os.path.join(directory, "layout.json")) and _has_optimizer(directory)
        extra = load_checkpoint(directory, stage=self.stage, grid=self.grid, timeout_s=self.args.p2p_timeout,
                                optimizer=self.optimizer if full else None,
                                lr_scheduler=self.lr_scheduler if full else None)
        if self.precision.scaler is not None and "loss_scaler" in extra:
            self.precision.scaler.load_state_dict(extra["loss_scaler"])

    def _load_best_model(self) -> None:
        """Reload the best checkpoint's stage weights on every rank (not its optimizer or RNG)."""
        from merak.checkpoint import load_checkpoint

        self._finish_pending_save()
        logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint,
                    self.state.best_metric)
        load_checkpoint(self.state.best_model_checkpoint, stage=self.stage, grid=self.grid, restore_rng=False,
                        timeout_s=self.args.p2p_timeout)

    def _cuts(self) -> list[str]:
        """The partition plan's cut points (first node of stages 1..P-1), saved with checkpoints."""
        return [s.first_node for s in self.plan.stages[1:]]

    def _scaler_state(self) -> dict[str, Any]:
        scaler = self.precision.scaler
        return {} if scaler is None else {"loss_scaler": scaler.state_dict()}


# ---- helpers ------------------------------------------------------------------------------
def _placement(args: MerakArguments, grid: Any) -> Placement:
    """Which rank holds which model chunk under ``args.schedule`` (``chunks_per_stage`` for
    ``interleaved_1f1b``); everything else works per chunk."""
    return placement_for(args.schedule, grid.num_stages,
                         args.chunks_per_stage if args.schedule == "interleaved_1f1b" else None)


def _stage_aware_per_chunk(args: MerakArguments, placement: Placement) -> bool:
    """Whether ``recompute='stage_aware'`` is sized by the rule for virtual stages (several chunks
    per rank, no budget): per (rank, chunk) from the schedule's own in-flight counts
    (:mod:`merak.runtime.memory.stage_aware`)."""
    return placement.num_chunks > 1 and args.recompute == "stage_aware" and not args.max_memory_per_device


def _mode_activation_plan(args: MerakArguments, plan: Any, placement: Placement) -> ActivationPlan:
    """The per-layer plan of the ``recompute`` mode without a budget, over all ``P·v`` chunks."""
    if not _stage_aware_per_chunk(args, placement):
        return ActivationPlan.from_mode(args.recompute, plan)
    from merak.runtime.memory.stage_aware import stage_aware_layers

    return stage_aware_layers(plan, args.schedule, placement.num_ranks, args.gradient_accumulation_steps,
                              placement.num_chunks)




def _partition_cost_model(args: MerakArguments, graph: Any, example: Mapping[str, Any]) -> Any:
    """``None`` (the partitioner's FLOP roofline) or, with ``partition_cost_model="profile"``,
    node times measured on this device and averaged over all ranks so every stage cuts alike."""
    if args.partition_cost_model != "profile":
        return None
    from merak.partitioner.profiler import profile_costs

    measured = profile_costs(graph, example, device=merak.get_device())
    return measured.averaged(timeout_s=args.p2p_timeout)


def _calibrate(plan: Any, grid: Any, args: MerakArguments, example: Mapping[str, Any],
               loss_fn: LossFn | None, placement: Placement) -> Any:
    """``plan`` re-cut on its stage times measured in dry steps of the pipeline
    (:mod:`merak.runtime.pipeline.calibration`; M copies of the example micro-batch): 1F1B steps
    with one stage per rank, the training schedule's own with model chunks (each chunk timed).
    The times are gathered on every rank, so all ranks keep the same cut."""
    from merak.runtime.pipeline.calibration import calibrate_in_pipeline

    virtual = {"schedule": args.schedule, "placement": placement} if placement.num_chunks > 1 else {}
    microbatches = [example] * max(args.gradient_accumulation_steps, grid.num_stages)
    return calibrate_in_pipeline(plan, grid, microbatches, rounds=args.partition_calibration_rounds,
                                 device=merak.get_device(), loss_fn=loss_fn, seed=args.seed,
                                 fuse=args.fuse_ops, timeout_s=args.p2p_timeout, **virtual)


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
    example = collate(_first_samples(dataset, args.per_device_train_batch_size))
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


def _default_collator(processing_class: Any) -> Callable[[list[Any]], dict[str, Any]]:
    """HF's default: pad with the tokenizer when one is given, else stack."""
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

    if isinstance(processing_class, PreTrainedTokenizerBase):
        return DataCollatorWithPadding(processing_class)
    return default_data_collator


def _drop_unused_columns(dataset: Any, model: nn.Module, args: MerakArguments) -> Any:
    """HF's ``remove_unused_columns`` for a ``datasets.Dataset``: keep the columns the model's
    forward takes (and label columns)."""
    if dataset is None or not args.remove_unused_columns or not hasattr(dataset, "column_names") \
            or not hasattr(dataset, "remove_columns"):
        return dataset
    params = inspect.signature(model.forward).parameters
    keep = set(params) | {"label", "label_ids"} | set(args.label_names or [])
    unused = [c for c in dataset.column_names if c not in keep]
    return dataset.remove_columns(unused) if unused else dataset


def _is_stream(dataset: Any) -> bool:
    """A dataset read as a stream: a torch ``IterableDataset`` or anything without ``len``."""
    return isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__")


def _first_samples(dataset: Any, n: int) -> list[Any]:
    """The first ``n`` samples (the tracing example), from a map-style dataset or a stream."""
    if _is_stream(dataset):
        import itertools

        return list(itertools.islice(iter(dataset), n))
    return [dataset[i] for i in range(min(len(dataset), n))]


def _loss_reads_num_items(model: nn.Module) -> bool:
    """Whether the model's loss depends on HF's ``num_items_in_batch``: its ``forward`` hands
    ``**kwargs`` to HF's ``self.loss_function`` (causal LMs) or names the argument. Read from the
    source, since a model with ``**kwargs`` may drop it (``BertForSequenceClassification``, T5
    compute a plain mean); no source available: assume it does, HF's common case."""
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return True
    return "loss_function(" in source or "num_items_in_batch" in source


def _has_optimizer(directory: str) -> bool:
    import json

    return bool(json.load(open(os.path.join(directory, "layout.json"))).get("optimizer"))


def _barrier(timeout_s: float) -> None:
    collectives.barrier("a barrier after saving a checkpoint", timeout_s=timeout_s)


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
