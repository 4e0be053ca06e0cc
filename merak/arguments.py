"""``MerakArguments``: ``TrainingArguments`` plus Merak's pipeline knobs.

Two HF fields change meaning under pipeline parallelism, and only these two:

* ``per_device_train_batch_size`` is the **micro-batch** size (one pipeline work item);
* ``gradient_accumulation_steps`` is the **number of micro-batches** each data-parallel replica
  runs per optimizer step. The pipeline needs several to keep stages busy, so fewer than ``pp``
  triggers a warning.

The global batch of one step is ``micro-batch × micro-batches × dp`` samples.

``--deepspeed ds_config.json`` is accepted for users arriving from DeepSpeed: the keys that
mean something here (micro-batch, accumulation, clipping, bf16/fp16, optimizer and scheduler
blocks) are mapped onto these fields; keys whose feature cannot work with pipeline parallelism
(ZeRO stage 2/3) are refused with a message instead of being silently ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

SCHEDULE_CHOICES = ("gpipe", "1f1b", "shifted_critical_path", "zero_bubble", "interleaved_1f1b", "zb_v",
                    "dualpipe_v")
RECOMPUTE_CHOICES = ("none", "full", "selective", "stage_aware")
PARTITION_CHOICES = ("cost", "parameters", "uniform", "manual")
ZERO_CHOICES = (0, 1)
COST_MODEL_CHOICES = ("flops", "profile")
MOE_CHOICES = ("tensor", "expert")


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config key that Merak cannot honour."""


@dataclass
class MerakArguments(TrainingArguments):
    """Hugging Face ``TrainingArguments`` with Merak's pipeline, recompute and partition fields."""

    schedule: str = field(
        default="1f1b",
        metadata={"help": "Pipeline schedule: gpipe | 1f1b | shifted_critical_path | zero_bubble, or one with "
                          "virtual stages (several model chunks per rank): interleaved_1f1b (needs "
                          "gradient_accumulation_steps a multiple of pp) | zb_v | dualpipe_v (needs "
                          "gradient_accumulation_steps >= 2*pp).",
                  "choices": SCHEDULE_CHOICES},
    )
    chunks_per_stage: int = field(
        default=2,
        metadata={"help": "Model chunks per pipeline rank under interleaved_1f1b (>= 2); zb_v and dualpipe_v "
                          "always use 2, the other schedules 1."},
    )
    recompute: str = field(
        default="none",
        metadata={"help": "Activation recomputation per layer: none | full (every layer) | selective (only "
                          "the attention core, as Megatron) | stage_aware (early stages, which hold more "
                          "in-flight micro-batches, recompute more of their layers).",
                  "choices": RECOMPUTE_CHOICES},
    )
    tp_sub_microbatches: int = field(
        default=1,
        metadata={"help": "Split each micro-batch into this many sub-micro-batches so one's tensor-"
                          "parallel all-reduce overlaps the next one's compute (1 = off)."},
    )
    tp_mapping: list[str] = field(
        default_factory=list,
        metadata={"help": "Tensor-parallel overrides, 'module.name.pattern=style' (fnmatch patterns on "
                          "qualified module names; style: column | row | replicate | vocab), e.g. "
                          "'*.c_attn=column' '*.attn.c_proj=row'. Completes or overrides the automatic plan."},
    )
    moe_parallel: str = field(
        default="tensor",
        metadata={"help": "How tensor parallelism shards mixture-of-experts layers (the router stays "
                          "replicated): tensor (every expert's feed-forward split over the tp ranks, one "
                          "all-reduce) | expert (num_experts/tp whole experts per rank, tokens exchanged "
                          "with all-to-all, as Megatron-core's expert parallelism over the tp group).",
                  "choices": MOE_CHOICES},
    )
    partition_method: str = field(
        default="cost",
        metadata={"help": "How the model is cut into stages: cost (balanced FLOP-based cost, default) | "
                          "parameters | uniform (by layer) | manual (see partition_cuts).",
                  "choices": PARTITION_CHOICES},
    )
    partition_cost_model: str = field(
        default="flops",
        metadata={"help": "What partition_method=cost balances: flops (roofline estimate from FLOPs and "
                          "bytes, no device time spent) | profile (time every node on this device with one "
                          "micro-batch, averaged over ranks; a few seconds at start-up, better balance "
                          "when norms, softmax and the loss cost more than their FLOPs say).",
                  "choices": COST_MODEL_CHOICES},
    )
    partition_calibration_rounds: int = field(
        default=0,
        metadata={"help": "With partition_method=cost: after cutting, time the stages themselves (forward and "
                          "backward of one micro-batch, every stage on every rank, averaged) and correct the cut "
                          "up to this many times; 0 = off. Fixes cost models whose node costs do not add up per "
                          "stage; each round costs about 9 micro-batch steps of the whole model."},
    )
    fuse_ops: bool = field(
        default=True,
        metadata={"help": "Replace traced op chains that PyTorch has as one kernel (e.g. GPT-2's tanh GELU, 8 "
                          "element-wise ops) by that kernel in every stage; equal up to float rounding."},
    )
    partition_cuts: list[str] = field(
        default_factory=list,
        metadata={"help": "With partition_method=manual: the module names that start stages 1..P-1, "
                          "e.g. transformer.h.3 transformer.h.6."},
    )
    leaf_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "Module class names or qualified names the tracer keeps opaque (use it "
                          "when tracing fails inside a module)."},
    )
    load_weights_from: str | None = field(
        default=None,
        metadata={"help": "A save_pretrained directory whose weights replace the model's initialization; "
                          "each stage reads only its own tensors (build the model under "
                          "merak.init_empty_weights() so no rank ever holds the whole model)."},
    )
    max_memory_per_device: str | None = field(
        default=None,
        metadata={"help": "Memory budget per device, e.g. '80GB' (GB = GiB here). With recompute=stage_aware "
                          "each stage recomputes the fewest layers that fit it; with other modes the budget is "
                          "checked. An infeasible budget is refused at start-up with the smallest one that fits."},
    )
    activation_offload: bool = field(
        default=False,
        metadata={"help": "With max_memory_per_device and recompute=stage_aware: the planner may also move "
                          "layers' activations to host memory where the transfer hides under compute "
                          "(cheaper than recomputing them)."},
    )
    auto_parallel: bool = field(
        default=False,
        metadata={"help": "Choose dp, tp, pp, the micro-batch, schedule, recomputation and "
                          "tp_sub_microbatches at start-up with Merak's cluster simulator (as "
                          "`python -m merak.planner` would) for the launched world size, keeping the global "
                          "batch per_device_train_batch_size x gradient_accumulation_steps x world size. "
                          "Do not call merak.init yourself then."},
    )
    log_throughput: bool = field(
        default=False,
        metadata={"help": "Add tokens_per_second, tflops_per_device, peak_memory_mb (and fp16's loss_scale / "
                          "skipped_steps) to every training log entry. Off by default so log_history has exactly "
                          "HF's keys; the figures are logged by the 'merak' logger either way."},
    )
    p2p_timeout: float = field(
        default_factory=lambda: float(os.environ.get("MERAK_TIMEOUT_S", 300)),
        metadata={"help": "Seconds any pipeline send/receive or collective may wait before failing "
                          "with an error that names the ranks involved. Default: the MERAK_TIMEOUT_S "
                          "environment variable, else 300 (one timeout setting everywhere)."},
    )
    zero_stage: int = field(
        default=0,
        metadata={"help": "ZeRO optimization stage: 0 (off) | 1 (optimizer states sharded over each "
                          "stage's data-parallel replicas: ~1/dp of the Adam moments per rank).",
                  "choices": ZERO_CHOICES},
    )
    async_save: bool = field(
        default=False,
        metadata={"help": "Write checkpoints in the background (torch.distributed.checkpoint.async_save): "
                          "the state is copied to host memory, training goes on while a thread writes it, "
                          "and the checkpoint is published (complete, resumable) when the next save starts "
                          "or training ends. Costs one host copy of each rank's state while writing."},
    )
    fp16_initial_loss_scale: float = field(
        default=2.0**16,
        metadata={"help": "With fp16=True: the dynamic loss scale to start from."},
    )
    fp16_loss_scale_window: int = field(
        default=1000,
        metadata={"help": "With fp16=True: double the loss scale after this many steps without overflow."},
    )
    fp16_min_loss_scale: float = field(
        default=1.0,
        metadata={"help": "With fp16=True: the loss scale never halves below this."},
    )

    def __post_init__(self) -> None:
        for name, choices in (("schedule", SCHEDULE_CHOICES), ("recompute", RECOMPUTE_CHOICES),
                              ("partition_method", PARTITION_CHOICES),
                              ("partition_cost_model", COST_MODEL_CHOICES), ("moe_parallel", MOE_CHOICES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        if self.zero_stage not in ZERO_CHOICES:
            raise ValueError(f"zero_stage={self.zero_stage!r}: Merak implements ZeRO stage 0 or 1; stages 2/3 "
                             f"shard gradients/parameters, which conflicts with pipeline parallelism")
        if self.tp_sub_microbatches < 1:
            raise ValueError(f"tp_sub_microbatches={self.tp_sub_microbatches} must be >= 1 (1 = off)")
        if self.max_memory_per_device is not None:
            from merak.runtime.memory.estimator import parse_bytes

            parse_bytes(self.max_memory_per_device)  # a clear error now rather than at the first step
        elif self.activation_offload:
            raise ValueError("activation_offload=True is decided against a memory budget; set "
                             "max_memory_per_device (e.g. '80GB') as well")
        if self.partition_calibration_rounds < 0:
            raise ValueError(f"partition_calibration_rounds={self.partition_calibration_rounds} must be >= 0 "
                             f"(0 = no calibration)")
        if self.partition_calibration_rounds and self.partition_method != "cost":
            raise ValueError(f"partition_calibration_rounds re-balances cost-based cuts, but partition_method="
                             f"{self.partition_method!r}; use partition_method='cost' or set the rounds to 0")
        if self.partition_method == "manual" and not self.partition_cuts:
            raise ValueError("partition_method='manual' needs partition_cuts (module names that "
                             "start stages 1..P-1)")
        if self.deepspeed:
            self.apply_deepspeed_config(self.deepspeed)
            # HF would hand the model to DeepSpeed's engine; Merak runs its own pipeline engine.
            self.deepspeed = None
        if not torch.cuda.is_available():
            # Merak places stages itself (merak.init picks cpu/gloo without CUDA); telling HF keeps
            # its device checks (e.g. bf16 "needs a GPU") in line with that choice.
            self.use_cpu = True
        super().__post_init__()

    # ---- DeepSpeed config ---------------------------------------------------------------
    def _apply_deepspeed_fp16(self, fp16: dict[str, Any]) -> None:
        """DeepSpeed's dynamic loss-scale keys; a static ``loss_scale`` is refused."""
        if fp16.get("loss_scale", 0) not in (0, "auto"):
            raise DeepSpeedConfigError(f"fp16.loss_scale={fp16['loss_scale']} (a static loss scale) is not "
                                       f"supported; remove it (0 = dynamic scaling, set the start with "
                                       f"initial_scale_power)")
        if fp16.get("initial_scale_power") not in (None, "auto"):
            self.fp16_initial_loss_scale = 2.0 ** fp16["initial_scale_power"]
        if fp16.get("loss_scale_window") not in (None, "auto"):
            self.fp16_loss_scale_window = fp16["loss_scale_window"]
        if fp16.get("min_loss_scale") not in (None, "auto"):
            self.fp16_min_loss_scale = fp16["min_loss_scale"]

    def apply_deepspeed_config(self, config: str | os.PathLike | dict[str, Any]) -> None:
        """Map a DeepSpeed JSON config onto these arguments (see the module docstring)."""
        if not isinstance(config, dict):
            with open(config) as f:
                config = json.load(f)
        zero = config.get("zero_optimization", {}).get("stage", 0)
        if zero not in (0, 1):
            raise DeepSpeedConfigError(
                f"zero_optimization.stage={zero} shards gradients/parameters across data-parallel "
                f"ranks, which conflicts with pipeline parallelism; use stage 0 or 1 (Merak implements "
                f"ZeRO-1) or remove the block."
            )
        if "stage" in config.get("zero_optimization", {}):
            self.zero_stage = zero
        simple = {"train_micro_batch_size_per_gpu": "per_device_train_batch_size",
                  "gradient_accumulation_steps": "gradient_accumulation_steps",
                  "gradient_clipping": "max_grad_norm"}
        for key, attr in simple.items():
            if key in config and config[key] != "auto":
                setattr(self, attr, config[key])
        for precision in ("bf16", "fp16"):
            if config.get(precision, {}).get("enabled") is True:
                setattr(self, precision, True)
        self._apply_deepspeed_fp16(config.get("fp16", {}))
        opt = config.get("optimizer")
        if opt:
            kind, params = opt.get("type", "").lower(), opt.get("params", {})
            if kind not in ("adam", "adamw"):
                raise DeepSpeedConfigError(f"optimizer.type={opt.get('type')!r}: only Adam/AdamW map "
                                           f"onto a torch optimizer here; remove the block or use AdamW")
            self.optim = "adamw_torch"
            if "lr" in params and params["lr"] != "auto":
                self.learning_rate = params["lr"]
            if "weight_decay" in params and params["weight_decay"] != "auto":
                self.weight_decay = params["weight_decay"]
            betas = params.get("betas")
            if betas and betas != "auto":
                self.adam_beta1, self.adam_beta2 = betas
            if "eps" in params and params["eps"] != "auto":
                self.adam_epsilon = params["eps"]
        sched = config.get("scheduler")
        if sched:
            kind, params = sched.get("type"), sched.get("params", {})
            mapping = {"WarmupLR": "constant_with_warmup", "WarmupDecayLR": "linear",
                       "WarmupCosineLR": "cosine"}
            if kind not in mapping:
                raise DeepSpeedConfigError(f"scheduler.type={kind!r} has no equivalent here; use one of "
                                           f"{sorted(mapping)} or set lr_scheduler_type instead")
            self.lr_scheduler_type = mapping[kind]
            if params.get("warmup_num_steps") not in (None, "auto"):
                self.warmup_steps = params["warmup_num_steps"]
        unsupported = sorted(set(config) - {
            "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
            "bf16", "fp16", "optimizer", "scheduler", "zero_optimization", "train_batch_size",
            "steps_per_print", "wall_clock_breakdown"})
        if unsupported:
            raise DeepSpeedConfigError(
                f"DeepSpeed config keys {unsupported} have no Merak equivalent; remove them (Merak's "
                f"own fields are MerakArguments.schedule, recompute, partition_method, ...)"
            )
