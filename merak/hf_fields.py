"""What Merak does with every ``transformers.TrainingArguments`` field: honoured, mapped or refused.

A drop-in trainer must never ignore a knob silently. :data:`FIELDS` lists each HF field with
its policy; :func:`check_training_arguments` raises for a *refused* field set to a non-default
value (the message names the alternative) and applies the *mapped* ones. ``tests/
test_trainer_fidelity.py`` walks the installed ``TrainingArguments`` so that a field added by a
new transformers release fails the test until it is classified here, and checks that
``docs/trainer.md`` lists every field (:func:`markdown_table` renders that table).

* ``honoured``: behaves as in ``transformers.Trainer`` (HF's own loop, callbacks, checkpoint
  rotation and metrics run; Merak plugs the pipeline in where HF runs a step or a forward).
* ``mapped``: the field means something slightly different, or drives a Merak mechanism.
* ``refused``: a non-default value raises ``ValueError`` naming what to use instead.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

logger = logging.getLogger("merak")

HONOURED, MAPPED, REFUSED = "honoured", "mapped", "refused"
POLICIES = (HONOURED, MAPPED, REFUSED)

_H = HONOURED
_M = MAPPED
_R = REFUSED

#: field name -> (policy, how / why)
FIELDS: dict[str, tuple[str, str]] = {
    "output_dir": (_H, "checkpoints, exports and logs go there"),
    "per_device_train_batch_size": (_M, "the **micro-batch** size (one pipeline work item)"),
    "num_train_epochs": (_H, "HF's epoch loop"),
    "max_steps": (_H, "HF's epoch loop"),
    "learning_rate": (_H, "HF's optimizer over the local stage's parameters"),
    "lr_scheduler_type": (_H, "HF's scheduler, `reduce_lr_on_plateau` included (stepped after evaluation)"),
    "lr_scheduler_kwargs": (_H, "HF's scheduler"),
    "warmup_steps": (_H, "HF's scheduler"),
    "optim": (_H, "HF's optimizer class over the local stage (sharded with `zero_stage=1`)"),
    "optim_args": (_H, "HF's optimizer"),
    "weight_decay": (_H, "HF's parameter groups (decay names from the original model's parameter names)"),
    "adam_beta1": (_H, "HF's optimizer"),
    "adam_beta2": (_H, "HF's optimizer"),
    "adam_epsilon": (_H, "HF's optimizer"),
    "optim_target_modules": (_R, "GaLore/APOLLO-style optimizers need the whole model; use a standard `optim`"),
    "gradient_accumulation_steps": (_M, "the **number of micro-batches** per step and DP replica"),
    "average_tokens_across_devices": (_H, "token-normalised loss over all DP replicas (one all-reduce of the "
                                          "label count per step)"),
    "max_grad_norm": (_H, "global norm over all stages and TP shards, clipped before the step"),
    "label_smoothing_factor": (_H, "HF's `LabelSmoother` on the last stage's logits"),
    "bf16": (_M, "Merak's mixed precision: bf16 autocast over fp32 master weights"),
    "fp16": (_M, "Merak's mixed precision: fp16 autocast, dynamic loss scaling (`fp16_*` fields)"),
    "bf16_full_eval": (_R, "evaluation runs in the training precision; set `bf16=True` instead"),
    "fp16_full_eval": (_R, "evaluation runs in the training precision; set `fp16=True` instead"),
    "tf32": (_H, "set on the torch backends by `TrainingArguments` itself"),
    "activation_checkpointing": (_M, "`True` -> `recompute='full'` (every layer of every stage), logged"),
    "activation_checkpointing_kwargs": (_R, "use `recompute` (`full`, `selective`, `stage_aware`) and "
                                            "`activation_offload`"),
    "gradient_checkpointing": (_M, "`True` -> `recompute='full'`, logged (deprecated HF alias)"),
    "gradient_checkpointing_kwargs": (_R, "use `recompute` and `activation_offload`"),
    "torch_compile": (_R, "stages are fx graph modules run by Merak's executor; not compiled yet"),
    "torch_compile_backend": (_R, "see `torch_compile`"),
    "torch_compile_mode": (_R, "see `torch_compile`"),
    "use_liger_kernel": (_R, "Liger patches model classes before tracing; not supported"),
    "liger_kernel_config": (_R, "see `use_liger_kernel`"),
    "use_cache": (_H, "written to the model config as HF does; the traced training graph never uses a KV cache"),
    "neftune_noise_alpha": (_R, "NEFTune hooks the embedding module, which a stage does not hold as such"),
    "torch_empty_cache_steps": (_H, "the device cache is emptied every that many steps"),
    "auto_find_batch_size": (_R, "use `auto_parallel=True` (chooses micro-batch and layout)"),
    "logging_strategy": (_H, "HF's `DefaultFlowCallback`"),
    "logging_steps": (_H, "HF's `DefaultFlowCallback`"),
    "logging_first_step": (_H, "HF's `DefaultFlowCallback`"),
    "log_on_each_node": (_H, "HF's logging set-up"),
    "logging_nan_inf_filter": (_H, "as HF: a non-finite step loss adds the running mean instead"),
    "include_num_input_tokens_seen": (_H, "counted from the replicas' micro-batches"),
    "log_level": (_H, "HF's logging set-up"),
    "log_level_replica": (_H, "HF's logging set-up"),
    "disable_tqdm": (_H, "HF's progress callback (rank 0)"),
    "report_to": (_H, "HF's integration callbacks"),
    "run_name": (_H, "HF's integration callbacks"),
    "project": (_H, "HF's integration callbacks"),
    "trackio_space_id": (_H, "HF's integration callbacks"),
    "trackio_bucket_id": (_H, "HF's integration callbacks"),
    "trackio_static_space_id": (_H, "HF's integration callbacks"),
    "eval_strategy": (_H, "HF's `DefaultFlowCallback`; evaluation runs pipelined"),
    "eval_steps": (_H, "HF's `DefaultFlowCallback`"),
    "eval_delay": (_H, "HF's `DefaultFlowCallback`"),
    "per_device_eval_batch_size": (_M, "the evaluation micro-batch size (micro-batches are dealt round-robin "
                                       "to DP replicas)"),
    "prediction_loss_only": (_H, "predictions are then never gathered"),
    "eval_on_start": (_H, "HF's training loop"),
    "eval_do_concat_batches": (_H, "HF's `EvalLoopContainer`"),
    "eval_use_gather_object": (_M, "predictions always travel as objects from the last stages to every rank"),
    "eval_accumulation_steps": (_H, "predictions move to the CPU after every micro-batch (at least as often)"),
    "include_for_metrics": (_H, "`inputs` and `loss` reach `compute_metrics` as in HF"),
    "batch_eval_metrics": (_H, "`compute_metrics(..., compute_result=...)` per micro-batch, in dataset order"),
    "save_only_model": (_H, "checkpoints then hold weights only (no optimizer, scheduler, RNG)"),
    "save_strategy": (_H, "HF's `DefaultFlowCallback`, `best` included"),
    "save_steps": (_H, "HF's `DefaultFlowCallback`"),
    "save_on_each_node": (_R, "every rank writes its own shard to one shared directory; leave it False"),
    "save_total_limit": (_H, "HF's checkpoint rotation (the best checkpoint is kept)"),
    "enable_jit_checkpoint": (_R, "not supported: use `save_strategy`"),
    "push_to_hub": (_R, "export with `save_model` and push the folder yourself"),
    "hub_token": (_H, "read only with `push_to_hub` (refused)"),
    "hub_private_repo": (_H, "read only with `push_to_hub` (refused)"),
    "hub_model_id": (_H, "read only with `push_to_hub` (refused)"),
    "hub_strategy": (_H, "read only with `push_to_hub` (refused)"),
    "hub_always_push": (_H, "read only with `push_to_hub` (refused)"),
    "hub_revision": (_H, "read only with `push_to_hub` (refused)"),
    "load_best_model_at_end": (_H, "the best checkpoint's stage weights are reloaded on every rank"),
    "metric_for_best_model": (_H, "HF's best-metric tracking"),
    "greater_is_better": (_H, "HF's best-metric tracking"),
    "ignore_data_skip": (_H, "resumed epochs restart their data from the epoch start"),
    "restore_callback_states_from_checkpoint": (_H, "HF's callback-state restore"),
    "full_determinism": (_H, "HF's `enable_full_determinism`"),
    "seed": (_H, "HF's seeding; also Merak's per-parameter initialisation of meta models"),
    "data_seed": (_H, "seeds the training order (default: `seed`)"),
    "use_cpu": (_M, "set by Merak when no CUDA device exists (`merak.init` places stages)"),
    "accelerator_config": (_R, "Accelerate does not drive the training loop here; leave it unset"),
    "parallelism_config": (_R, "use `merak.init(dp=, tp=, pp=)` or `auto_parallel=True`"),
    "dataloader_drop_last": (_M, "training always drops an incomplete last global batch (a pipeline step "
                                 "needs its M full micro-batches); evaluation keeps its tail either way"),
    "dataloader_num_workers": (_R, "micro-batches are collated in the training process; leave it 0"),
    "dataloader_pin_memory": (_M, "batches are copied to the device with non-blocking copies, unpinned"),
    "dataloader_persistent_workers": (_R, "no worker processes; leave it False"),
    "dataloader_prefetch_factor": (_R, "no worker processes; leave it unset"),
    "dataloader_multiprocessing_context": (_R, "no worker processes; leave it unset"),
    "dataloader_in_order": (_H, "batches are always in order"),
    "remove_unused_columns": (_H, "columns of a `datasets.Dataset` that the model's forward does not take are "
                                  "dropped"),
    "label_names": (_H, "which batch keys are labels for predictions and metrics"),
    "train_sampling_strategy": (_H, "`random` (seeded permutation per epoch) and `sequential`; "
                                    "`group_by_length` is refused"),
    "length_column_name": (_H, "read only with `group_by_length` (refused)"),
    "ddp_find_unused_parameters": (_M, "no DDP wrapper: Merak's reducer never waits for unused parameters"),
    "ddp_bucket_cap_mb": (_M, "the bucket size of Merak's data-parallel gradient reducer"),
    "ddp_broadcast_buffers": (_R, "buffers are not broadcast; leave it unset"),
    "ddp_static_graph": (_M, "no DDP wrapper: the graph is static by construction (fx stages)"),
    "ddp_backend": (_R, "`merak.init` picks nccl/gloo; leave it unset"),
    "ddp_timeout": (_R, "use `p2p_timeout` (bounds every wait and names the peer)"),
    "fsdp": (_R, "use `zero_stage=1` and pipeline/tensor parallelism"),
    "fsdp_config": (_R, "see `fsdp`"),
    "deepspeed": (_M, "its config keys are mapped onto these fields (`MerakArguments.apply_deepspeed_config`)"),
    "debug": (_R, "HF's debug options hook the whole model; leave it empty"),
    "skip_memory_metrics": (_H, "HF's memory tracker"),
    "do_train": (_H, "not read by the Trainer (as in HF): for scripts"),
    "do_eval": (_H, "not read by the Trainer (as in HF): for scripts"),
    "do_predict": (_H, "not read by the Trainer (as in HF): for scripts"),
    "resume_from_checkpoint": (_H, "not read by the Trainer (as in HF): pass it to `train()`"),
    "local_rank": (_H, "set by the launcher"),
}

#: refused fields whose value is fine in these special cases (HF rewrites them in ``__post_init__``)
_ALLOWED = {"train_sampling_strategy": ("random", "sequential"), "debug": ("", [], None),
            "accelerator_config": (None,)}


def _defaults() -> dict[str, Any]:
    from transformers import TrainingArguments

    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _is_default(args: Any, name: str, default: Any) -> bool:
    value = getattr(args, name, default)
    if name in _ALLOWED:
        return value in _ALLOWED[name] or (hasattr(value, "value") and value.value in _ALLOWED[name])
    if value == default or (hasattr(value, "value") and value.value == default):
        return True
    return value in (None, False, 0, "", [], {}) and default in (None, False, 0, "", [], {})


def check_training_arguments(args: Any) -> None:
    """Raise for a refused field set to a non-default value; apply the mapped ones (in place)."""
    defaults = _defaults()
    refused = [n for n, (policy, _) in FIELDS.items()
               if policy == REFUSED and n in defaults and not _is_default(args, n, defaults[n])]
    if getattr(args, "accelerator_config", None) is not None:
        # HF turns None into an AcceleratorConfig in __post_init__; refuse only a user's own config.
        from transformers.trainer_pt_utils import AcceleratorConfig

        if getattr(args, "accelerator_config") != AcceleratorConfig():
            refused.append("accelerator_config")
        else:
            refused = [n for n in refused if n != "accelerator_config"]
    if refused:
        details = "; ".join(f"{n}={getattr(args, n)!r}: {FIELDS[n][1]}" for n in refused)
        raise ValueError(f"MerakTrainer does not support these TrainingArguments: {details}")
    if (getattr(args, "gradient_checkpointing", None) or getattr(args, "activation_checkpointing", None)) \
            and args.recompute == "none":
        args.recompute = "full"
        logger.info("gradient_checkpointing=True -> recompute='full' (every layer of every stage recomputes; "
                    "recompute='stage_aware' recomputes only where memory needs it)")


def markdown_table() -> str:
    """The field table of ``docs/trainer.md``."""
    rows = ["| field | policy | how |", "|---|---|---|"]
    rows += [f"| `{name}` | {policy} | {how} |" for name, (policy, how) in FIELDS.items()]
    return "\n".join(rows)
