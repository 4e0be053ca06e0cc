"""Pipelined evaluation and prediction behind HF's ``evaluate()`` / ``predict()``.

HF's ``evaluate``/``predict`` stay as they are (metric prefixes, speed metrics, ``on_evaluate``,
``on_predict``, the memory tracker, multiple eval sets); only ``evaluation_loop`` changes:

* micro-batches of ``per_device_eval_batch_size`` samples are dealt round-robin to the DP
  replicas and run through forward-only pipeline passes of up to ``gradient_accumulation_steps``
  micro-batches (a pass keeps only the micro-batches in flight: the executor drops each one's
  tensors once sent, and the last stage hands its outputs to :class:`_Collector` at once);
* on the last stage each micro-batch's ``(loss, logits, labels)`` is taken as HF's
  ``prediction_step`` takes them (``outputs[1:]`` for a tuple, every key but ``loss`` and
  ``ignore_keys`` for a dict), ``preprocess_logits_for_metrics`` runs right there, and the results
  move to the CPU;
* the last stages' results are gathered on every rank and put back in dataset order, then the
  metrics are computed exactly as HF's loop does (the loss of a micro-batch counts once per
  sample, ``logging_nan_inf_filter``, ``compute_metrics(EvalPrediction)``, ``batch_eval_metrics``,
  ``include_for_metrics``, ``{prefix}_`` keys) into HF's ``EvalLoopOutput``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from merak.runtime.distributed.collectives import all_gather_along
from merak.runtime.distributed.objects import all_gather_objects
from merak.runtime.pipeline.executor import loss_key
from merak.runtime.pipeline.schedules import forward_only

if TYPE_CHECKING:
    from merak.data import EvalLoader
    from merak.trainer import MerakTrainer


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def prediction_logits(outputs: Mapping[str, Any], ignore_keys: list[str], has_loss: bool) -> Any:
    """HF's ``prediction_step`` logits from the last stage's flat outputs: a tuple model's
    ``outputs[1:]`` (``outputs`` without labels), a dict's values but ``loss`` and ``ignore_keys``;
    one tensor when only one remains."""
    key = loss_key(outputs)
    if key == "output_0":  # a tuple model
        logits = tuple(v for k, v in outputs.items() if k != "output_0" or not has_loss)
    else:
        logits = tuple(v for k, v in outputs.items() if k not in [*ignore_keys, "loss"])
    return logits[0] if len(logits) == 1 else logits


class _Collector:
    """Last stage: per micro-batch, what HF's ``prediction_step`` returns, on the CPU."""

    def __init__(self, trainer: MerakTrainer, microbatches: list[dict[str, Any]], indices: list[int],
                 loss_only: bool, ignore_keys: list[str]) -> None:
        self.trainer, self.microbatches, self.indices = trainer, microbatches, indices
        self.loss_only, self.ignore_keys = loss_only, ignore_keys
        self.rows: list[dict[str, Any]] = []

    def __call__(self, m: int, outputs: Mapping[str, Any], loss: torch.Tensor | None) -> None:
        trainer, batch = self.trainer, self.microbatches[m]
        names = trainer.label_names
        has_labels = bool(names) and all(batch.get(k) is not None for k in names)
        labels = None
        if has_labels:
            labels = tuple(batch[k] for k in names)
            labels = labels[0] if len(labels) == 1 else labels
        logits = None
        if not self.loss_only:
            logits = prediction_logits(self._whole(outputs), self.ignore_keys, loss is not None)
            if trainer.preprocess_logits_for_metrics is not None:
                logits = trainer.preprocess_logits_for_metrics(logits, labels)
        main = getattr(trainer.original_model, "main_input_name", "input_ids")
        inputs = batch.get(main) if "inputs" in trainer.args.include_for_metrics else None
        self.rows.append({"index": self.indices[m], "size": _batch_size(batch), "loss": _to_cpu(loss),
                          "logits": _to_cpu(logits), "labels": _to_cpu(labels), "inputs": _to_cpu(inputs)})


    def _whole(self, outputs: Mapping[str, Any]) -> Mapping[str, Any]:
        """Outputs a tensor-parallel stage keeps sharded (a vocab-parallel head's logits),
        gathered over the TP group: every TP rank of the last stage runs this micro-batch now."""
        trainer = self.trainer
        sharded = getattr(trainer.stage, "tp_sharded_outputs", None) or {}
        if trainer.grid.dims.tp == 1 or not sharded:
            return outputs
        return {k: all_gather_along(v, sharded[k], trainer.grid.tp_group, trainer.args.p2p_timeout,
                                    f"the tensor-parallel shards of output {k!r}")
                if k in sharded and isinstance(v, torch.Tensor) else v for k, v in outputs.items()}


def _batch_size(batch: Mapping[str, Any]) -> int:
    from transformers.trainer_pt_utils import find_batch_size

    return int(find_batch_size(dict(batch)) or 1)


def pipelined_evaluation_loop(trainer: MerakTrainer, loader: EvalLoader, description: str,
                              prediction_loss_only: bool | None, ignore_keys: list[str] | None,
                              metric_key_prefix: str) -> Any:
    from transformers.trainer_pt_utils import EvalLoopContainer
    from transformers.trainer_utils import EvalLoopOutput, EvalPrediction, denumpify_detensorize

    args, grid = trainer.args, trainer.grid
    loss_only = prediction_loss_only if prediction_loss_only is not None else args.prediction_loss_only
    if ignore_keys is None:
        config = getattr(trainer.original_model, "config", None)
        ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", ["cache"])) if config is not None else []
    executor = trainer._pipeline_executor()
    trainer.callback_handler.eval_dataloader = loader
    chunk = max(args.gradient_accumulation_steps, grid.num_stages, 1)
    rows: list[dict[str, Any]] = []
    was_training = trainer.stage.training
    trainer.stage.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(loader.indices), chunk):
                indices = loader.indices[start:start + chunk]
                part = [loader.microbatch(i) for i in indices]
                collect = _Collector(trainer, part, indices, loss_only, ignore_keys) if trainer.computes_loss else None
                executor.run(forward_only.build(grid.num_stages, len(part), grid.stage_id, trainer.placement), part,
                             on_output=collect)
                if collect is not None:
                    rows += collect.rows
                for _ in part:
                    trainer.control = trainer.callback_handler.on_prediction_step(args, trainer.state, trainer.control)
    finally:
        trainer.stage.train(was_training)
    mine = rows if trainer.computes_loss and grid.coord.tp == 0 else []
    gathered = all_gather_objects(mine, args.p2p_timeout, f"the {description.lower()} predictions of the last stages")
    ordered = sorted((r for part in gathered for r in part), key=lambda r: r["index"])

    concat = args.eval_do_concat_batches
    all_losses, all_preds = EvalLoopContainer(concat, padding_index=-100), EvalLoopContainer(concat, padding_index=-100)
    all_labels, all_inputs = EvalLoopContainer(concat, padding_index=-100), EvalLoopContainer(concat, padding_index=-100)
    metrics: dict[str, Any] | None = None
    batched = args.batch_eval_metrics and description != "Prediction"
    for n, row in enumerate(ordered):
        losses = row["loss"].reshape(()).repeat(row["size"]) if row["loss"] is not None else None
        if losses is not None:
            all_losses.add(losses)
        if batched:
            if trainer.compute_metrics is not None and row["logits"] is not None and row["labels"] is not None:
                kwargs = {"losses": losses if "loss" in args.include_for_metrics else None,
                          "inputs": row["inputs"] if "inputs" in args.include_for_metrics else None}
                metrics = trainer.compute_metrics(EvalPrediction(predictions=row["logits"], label_ids=row["labels"],
                                                                 **kwargs), compute_result=n == len(ordered) - 1)
            continue
        if row["inputs"] is not None:
            all_inputs.add(row["inputs"])
        if row["logits"] is not None:
            all_preds.add(row["logits"])
        if row["labels"] is not None:
            all_labels.add(row["labels"])
    losses_np, preds, labels, inputs = (all_losses.get_arrays(), all_preds.get_arrays(), all_labels.get_arrays(),
                                        all_inputs.get_arrays())
    num_samples = len(loader.dataset) if hasattr(loader.dataset, "__len__") else sum(r["size"] for r in ordered)
    if trainer.compute_metrics is not None and preds is not None and labels is not None and not batched:
        kwargs = {"losses": losses_np if "loss" in args.include_for_metrics else None,
                  "inputs": inputs if "inputs" in args.include_for_metrics else None}
        metrics = trainer.compute_metrics(EvalPrediction(predictions=preds, label_ids=labels, **kwargs))
    elif metrics is None:
        metrics = {}
    metrics = denumpify_detensorize(metrics)
    if isinstance(losses_np, list) and losses_np:
        losses_np = np.concatenate(losses_np)
    if isinstance(losses_np, np.ndarray):
        finite = np.isfinite(losses_np)
        if args.logging_nan_inf_filter and finite.any():
            losses_np = losses_np[finite]
        metrics[f"{metric_key_prefix}_loss"] = losses_np.mean().item()
    for key in list(metrics):
        if not key.startswith(f"{metric_key_prefix}_"):
            metrics[f"{metric_key_prefix}_{key}"] = metrics.pop(key)
    return EvalLoopOutput(predictions=preds, label_ids=labels, metrics=metrics, num_samples=num_samples)
