"""MerakTrainer: loss-curve parity across layouts, the HF-script drop-in, and bad input."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from reference import hf_loss, single_process_run
from tiny_models import tiny_model

GLOBAL_MICROBATCHES, MICRO, SEQ, STEPS = 4, 2, 8, 5
#: models whose loss ignores HF's ``num_items_in_batch`` although their forward takes ``**kwargs``:
#: HF's Trainer then skips its division by the number of micro-batches, so a step trains on the
#: *sum* of the micro-batch losses - and MerakTrainer, a drop-in, does the same
SUMS_MICROBATCH_LOSSES = {"t5", "bert"}


def dataset(make_batch, n: int = 48) -> list[dict[str, torch.Tensor]]:
    """Samples as dicts of unbatched tensors (what an HF dataset with torch format yields)."""
    return [{k: v[0] for k, v in make_batch(batch_size=1, seq_len=SEQ, seed=i).items()} for i in range(n)]


def _train(kind: str, dp: int, pp: int, schedule: str = "1f1b", meta: bool = False, **extra: object) -> list[float]:
    import merak

    merak.init(dp=dp, pp=pp)
    model, make_batch = tiny_model(kind, meta=meta)
    args = merak.MerakArguments(
        output_dir="/tmp/merak-test-trainer", per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=GLOBAL_MICROBATCHES // dp,  # same global batch in every layout
        max_steps=STEPS, logging_steps=1, learning_rate=1e-2, lr_scheduler_type="linear",
        max_grad_norm=1.0, seed=7, report_to="none", save_strategy="no", schedule=schedule,
        disable_tqdm=True, **extra,
    )
    trainer = merak.MerakTrainer(model, args, train_dataset=dataset(make_batch))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def single_process_curve(kind: str) -> list[float]:
    """Plain PyTorch reference: same samples per step, AdamW, linear decay, clipping at 1."""
    from merak.data import StepBatches
    from transformers import default_data_collator, get_linear_schedule_with_warmup

    model, make_batch = tiny_model(kind)
    batches = StepBatches(dataset(make_batch), default_data_collator, MICRO, GLOBAL_MICROBATCHES, 1, 0, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    scale = GLOBAL_MICROBATCHES if kind in SUMS_MICROBATCH_LOSSES else 1
    curve, _ = single_process_run(model, [batches.microbatches(step) for step in range(STEPS)], opt,
                                  loss_of=lambda m, b: scale * hf_loss(m, b),
                                  scheduler=get_linear_schedule_with_warmup(opt, 0, STEPS), max_grad_norm=1.0)
    return curve


def _layout_cases() -> list:
    """(kind, layouts): GPT-2 on one rank and dp=2 x pp=2 and T5 at dp=2 x pp=2 in the default run;
    the single-axis layouts and the other families under -m slow (the default suite's time budget)."""
    slow = pytest.mark.slow
    return [pytest.param("gpt2", [(1, 1), (2, 2)], id="gpt2"),
            pytest.param("gpt2", [(1, 2), (2, 1)], id="gpt2-one-axis", marks=slow),
            pytest.param("t5", [(2, 2)], id="t5"),
            pytest.param("t5", [(1, 2)], id="t5-pp2", marks=slow),
            pytest.param("llama", [(1, 2), (2, 2)], id="llama", marks=slow),
            pytest.param("bert", [(1, 2), (2, 2)], id="bert", marks=slow)]


@pytest.mark.parametrize("kind, layouts", _layout_cases())
def test_loss_curve_is_layout_invariant(dist_run, kind, layouts):
    ref = single_process_curve(kind)
    for dp, pp in layouts:
        curves = dist_run(_train, dp * pp, kind, dp, pp, timeout=600)
        for rank, curve in enumerate(curves):  # identical on every rank, equal to the reference
            torch.testing.assert_close(curve, ref, rtol=2e-5, atol=2e-6,
                                       msg=f"{kind} dp={dp} pp={pp} rank {rank}")


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
@pytest.mark.parametrize("schedule, recompute", [
    pytest.param("interleaved_1f1b", "none", marks=pytest.mark.slow), ("zb_v", "none"),
    pytest.param("dualpipe_v", "none", marks=pytest.mark.slow),
    pytest.param("zb_v", "full", marks=pytest.mark.slow),
    pytest.param("interleaved_1f1b", "selective", marks=pytest.mark.slow),
    ("zb_v", "stage_aware"), pytest.param("interleaved_1f1b", "stage_aware", marks=pytest.mark.slow),
    pytest.param("dualpipe_v", "stage_aware", marks=pytest.mark.slow)])
def test_virtual_stage_schedules_match_single_process(dist_run, kind, schedule, recompute):
    """MerakTrainer(schedule=...) with two model chunks per rank (pp=2, M=4): the same loss
    curve as one process, with clipping (GPT-2's tied embedding counted once) and AdamW, also
    with per-layer recomputation planned per chunk (``stage_aware``: sized per (rank, chunk)
    from the schedule's in-flight counts; under zb_v rank 1's first chunk recomputes its layer)."""
    ref = single_process_curve(kind)
    results = dist_run(_train_virtual, 2, kind, schedule, recompute, timeout=600)
    for rank, (curve, eval_loss) in enumerate(results):
        torch.testing.assert_close(curve, ref, rtol=2e-5, atol=2e-6, msg=f"{kind} {schedule} rank {rank}")
        # the rank holding the last chunk (rank 0 in a V) reports it; every rank gets the same
        assert math.isfinite(eval_loss) and eval_loss == results[0][1], (rank, eval_loss)


#: ``max_memory_per_device`` of :func:`_train_virtual` meaning: first an impossible budget, which must be
#: refused naming the smallest one that fits, then that one.
SMALLEST_BUDGET = "smallest"


def _train_virtual(kind: str, schedule: str, recompute: str, extra: dict | None = None) -> tuple[list[float], float]:
    import merak
    from merak.runtime.memory.planner import MemoryBudgetError

    merak.init(pp=2)
    model, make_batch = tiny_model(kind)

    def trainer_with(**fields: object) -> merak.MerakTrainer:
        args = merak.MerakArguments(
            output_dir="/tmp/merak-test-trainer", per_device_train_batch_size=MICRO,
            gradient_accumulation_steps=GLOBAL_MICROBATCHES, max_steps=STEPS, logging_steps=1, learning_rate=1e-2,
            lr_scheduler_type="linear", max_grad_norm=1.0, seed=7, report_to="none", save_strategy="no",
            schedule=schedule, recompute=recompute, disable_tqdm=True, **fields)
        return merak.MerakTrainer(model, args, train_dataset=dataset(make_batch), eval_dataset=dataset(make_batch, 8))

    extra = dict(extra or {})
    if extra.get("max_memory_per_device") == SMALLEST_BUDGET:
        with pytest.raises(MemoryBudgetError, match="smallest budget that fits") as refused:
            trainer_with(**{**extra, "max_memory_per_device": "4096"})
        assert "pipeline rank" in str(refused.value) and "model chunks" in str(refused.value), refused.value
        extra["max_memory_per_device"] = str(refused.value.min_budget_bytes)
    trainer = trainer_with(**extra)
    if extra.get("max_memory_per_device"):  # the smallest budget is met only by recomputing (per chunk)
        plan = trainer._activation_plan()
        assert any(plan.actions(k) for k in range(plan.num_stages)), plan
    trainer.train()
    curve = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return curve, trainer.evaluate()["eval_loss"]


def test_virtual_stage_budget_is_planned_per_rank_and_matches_single_process(dist_run):
    """zb_v with ``max_memory_per_device``: an impossible budget is refused on every rank, naming
    the smallest that fits (ranks sized as the sum of their chunks); with that budget the planner
    recomputes layers per chunk and the loss curve is still one process's."""
    ref = single_process_curve("gpt2")
    results = dist_run(_train_virtual, 2, "gpt2", "zb_v", "stage_aware", {"max_memory_per_device": SMALLEST_BUDGET},
                       timeout=600)
    for rank, (curve, _) in enumerate(results):
        torch.testing.assert_close(curve, ref, rtol=2e-5, atol=2e-6, msg=f"rank {rank}")


@pytest.mark.slow
def test_virtual_stages_calibrate_the_partition_per_chunk(dist_run):
    """partition_calibration_rounds with zb_v: the 4 chunks are timed in dry zb_v steps and
    re-cut; wherever the cut lands, the loss curve is one process's."""
    ref = single_process_curve("gpt2")
    results = dist_run(_train_virtual, 2, "gpt2", "zb_v", "none", {"partition_calibration_rounds": 1}, timeout=600)
    for rank, (curve, _) in enumerate(results):
        torch.testing.assert_close(curve, ref, rtol=2e-5, atol=2e-6, msg=f"rank {rank}")


def test_meta_model_gets_the_same_weights_in_every_layout(dist_run):
    """Built under init_empty_weights, each stage initializes only its own parameters, seeded
    per parameter name: layouts must agree on the weights, hence on the whole loss curve."""
    curves = {(dp, pp): dist_run(_train, dp * pp, "gpt2", dp, pp, "1f1b", True, timeout=600)
              for dp, pp in [(1, 1), (2, 2)]}
    reference = curves[(1, 1)][0]
    assert reference[-1] < reference[0]  # it trains
    for layout, per_rank in curves.items():
        for rank, curve in enumerate(per_rank):
            torch.testing.assert_close(curve, reference, rtol=2e-5, atol=2e-6, msg=f"{layout} rank {rank}")


def _hf_style_script() -> float:
    """An HF Trainer script where only the import line and the two class names changed."""
    import merak
    from merak import MerakArguments as TrainingArguments, MerakTrainer as Trainer  # changed line

    merak.init(pp=2)  # added line
    model, make_batch = tiny_model("gpt2")
    args = TrainingArguments(output_dir="/tmp/merak-test-hf-script", per_device_train_batch_size=2,
                             gradient_accumulation_steps=4, max_steps=3, report_to="none",
                             save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(make_batch))
    return trainer.train().training_loss


def test_hf_script_runs_with_two_changed_lines(dist_run):
    losses = dist_run(_hf_style_script, 2)
    assert losses[0] == losses[1] and 0 < losses[0] < 10


def test_bad_dataset_keys_are_named():
    import merak

    model, make_batch = tiny_model("gpt2")
    bad = [{"tokens": v["input_ids"]} for v in dataset(make_batch, 4)]
    try:
        merak.init()
        with pytest.raises(ValueError, match=r"yields keys \['tokens'\] that GPT2LMHeadModel.forward does not take.*rename or drop"):
            merak.MerakTrainer(model, merak.MerakArguments(output_dir="/tmp/x", report_to="none"),
                               train_dataset=bad)
    finally:
        merak.shutdown()


def test_too_long_sequences_are_refused():
    import merak

    model, make_batch = tiny_model("gpt2")  # 64 positions
    long = [{k: v[0] for k, v in make_batch(batch_size=1, seq_len=80, seed=0).items()}]
    try:
        merak.init()
        with pytest.raises(ValueError, match=r"length 80 exceed the model's 64 positions"):
            merak.MerakTrainer(model, merak.MerakArguments(output_dir="/tmp/x", report_to="none",
                                                           per_device_train_batch_size=1),
                               train_dataset=long)
    finally:
        merak.shutdown()


def _few_microbatches() -> list[str]:
    import merak

    merak.init(pp=2)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("merak").addHandler(handler)
    model, make_batch = tiny_model("gpt2")
    merak.MerakTrainer(model, merak.MerakArguments(output_dir="/tmp/x", report_to="none",
                                                   gradient_accumulation_steps=1),
                       train_dataset=dataset(make_batch, 8))
    return records


def test_fewer_microbatches_than_stages_warns(dist_run):
    records = dist_run(_few_microbatches, 2)[0]
    assert any("pipeline will mostly idle" in r for r in records), records


def test_deepspeed_config_maps_and_refuses(tmp_path):
    import json

    import merak
    from merak.arguments import DeepSpeedConfigError

    cfg = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 6,
           "gradient_clipping": 0.5, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1}},
           "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 7}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    args = merak.MerakArguments(output_dir=str(tmp_path), deepspeed=str(path), report_to="none")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_grad_norm,
            args.bf16, args.learning_rate, args.weight_decay, args.warmup_steps) == (3, 6, 0.5, True, 3e-4, 0.1, 7)
    assert args.deepspeed is None  # Merak's engine runs the model, not DeepSpeed's
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(DeepSpeedConfigError, match="stage=3.*conflicts with pipeline parallelism"):
        merak.MerakArguments(output_dir=str(tmp_path), deepspeed=str(path), report_to="none")


def test_arguments_parse_from_command_line():
    from transformers import HfArgumentParser

    import merak

    (args,) = HfArgumentParser(merak.MerakArguments).parse_args_into_dataclasses(
        ["--output_dir", "/tmp/x", "--schedule", "zero_bubble", "--recompute", "full",
         "--partition_method", "uniform", "--leaf_modules", "GPT2Block", "LlamaDecoderLayer",
         "--report_to", "none", "--p2p_timeout", "30"])
    assert (args.schedule, args.recompute, args.partition_method, args.leaf_modules, args.p2p_timeout) == \
        ("zero_bubble", "full", "uniform", ["GPT2Block", "LlamaDecoderLayer"], 30.0)
    with pytest.raises(ValueError, match="schedule='pipedream' is not one of"):
        merak.MerakArguments(output_dir="/tmp/x", schedule="pipedream", report_to="none")


def test_p2p_timeout_defaults_to_merak_timeout_s(monkeypatch):
    import merak

    monkeypatch.setenv("MERAK_TIMEOUT_S", "20")
    assert merak.MerakArguments(output_dir="/tmp/x", report_to="none").p2p_timeout == 20.0
    monkeypatch.delenv("MERAK_TIMEOUT_S")
    assert merak.MerakArguments(output_dir="/tmp/x", report_to="none").p2p_timeout == 300.0


def _train_with_checkpoints(out: str, resume: str | None, async_save: bool = False,
                            schedule: str = "1f1b") -> list[tuple[int, float]]:
    import merak

    merak.init(pp=2)
    model, make_batch = tiny_model("gpt2")
    args = merak.MerakArguments(
        output_dir=out, per_device_train_batch_size=MICRO, gradient_accumulation_steps=GLOBAL_MICROBATCHES,
        max_steps=6, logging_steps=1, save_strategy="steps", save_steps=3, learning_rate=1e-2,
        lr_scheduler_type="linear", warmup_steps=2, seed=3, report_to="none", disable_tqdm=True,
        async_save=async_save, schedule=schedule)
    trainer = merak.MerakTrainer(model, args, train_dataset=dataset(make_batch))
    trainer.train(resume_from_checkpoint=resume)
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


def test_resume_from_checkpoint_is_bitwise(dist_run, tmp_path):
    # the first run writes its checkpoints in the background (async_save), the resumed one in place
    full = dist_run(_train_with_checkpoints, 2, str(tmp_path), None, True, timeout=600)[0]
    resumed = dist_run(_train_with_checkpoints, 2, str(tmp_path), str(tmp_path / "checkpoint-3"),
                       timeout=600)[0]
    assert [s for s, _ in full] == [1, 2, 3, 4, 5, 6]
    assert resumed == full  # steps 1-3 from the checkpoint's history, 4-6 recomputed: exactly equal


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [("1f1b", "interleaved_1f1b"), ("interleaved_1f1b", "1f1b")])
def test_resume_under_another_schedule(dist_run, tmp_path, before, after):
    """A pp=2 checkpoint resumes under a schedule with another chunk count (2 <-> 4 model
    chunks): HF's step, scheduler and Merak's optimizer states carry over, and the remaining
    losses equal the uninterrupted run's (1e-5: the chunks reduce in another order)."""
    full = dist_run(_train_with_checkpoints, 2, str(tmp_path), None, False, before, timeout=600)[0]
    resumed = dist_run(_train_with_checkpoints, 2, str(tmp_path / "b"), str(tmp_path / "checkpoint-3"), False,
                       after, timeout=600)[0]
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6] and resumed[:3] == full[:3]
    assert [loss for _, loss in resumed[3:]] == pytest.approx([loss for _, loss in full[3:]], rel=1e-5, abs=0)


def _virtual_train_evaluate_export(out: str, resume: str | None) -> tuple[list[tuple[int, float]], float]:
    import merak

    merak.init(pp=2)
    model, make_batch = tiny_model("gpt2")
    args = merak.MerakArguments(
        output_dir=out, per_device_train_batch_size=MICRO, gradient_accumulation_steps=GLOBAL_MICROBATCHES,
        max_steps=4, logging_steps=1, save_strategy="steps", save_steps=2, learning_rate=1e-2,
        seed=3, report_to="none", disable_tqdm=True, schedule="zb_v")
    trainer = merak.MerakTrainer(model, args, train_dataset=dataset(make_batch), eval_dataset=dataset(make_batch, 8))
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(f"{out}/export")
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e], trainer.evaluate()["eval_loss"]


@pytest.mark.slow
def test_virtual_stages_evaluate_resume_and_export(dist_run, tmp_path):
    """zb_v (GPT-2's embedding and LM head on one rank): evaluation equals the exported model's
    loss, resuming from a checkpoint is bitwise, and the export loads in transformers."""
    from transformers import AutoModelForCausalLM, default_data_collator

    full, eval_loss = dist_run(_virtual_train_evaluate_export, 2, str(tmp_path), None, timeout=600)[0]
    resumed, _ = dist_run(_virtual_train_evaluate_export, 2, str(tmp_path), str(tmp_path / "checkpoint-2"),
                          timeout=600)[0]
    assert [s for s, _ in full] == [1, 2, 3, 4] and resumed == full
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    _, make_batch = tiny_model("gpt2")
    samples = dataset(make_batch, 8)
    with torch.no_grad():
        losses = [exported(**default_data_collator(samples[i:i + MICRO])).loss for i in range(0, 8, MICRO)]
    torch.testing.assert_close(eval_loss, float(torch.stack(losses).mean()), rtol=1e-5, atol=1e-6)


def _import_train_export(weights: str, export: str, dp: int = 2, schedule: str = "1f1b") -> tuple[list[float], list[str]]:
    """(loss curve, the file keys this rank read) of a job importing ``weights`` into its stage
    (or model chunks), training two steps and exporting."""
    import merak
    import merak.checkpoint

    read: list[str] = []
    load = merak.checkpoint.load_pretrained_weights
    merak.checkpoint.load_pretrained_weights = lambda *a, **kw: read.extend(load(*a, **kw)) or read
    merak.init(dp=dp, pp=2)
    model, make_batch = tiny_model("gpt2", meta=True)  # nothing allocated until the stage
    args = merak.MerakArguments(
        output_dir=export, per_device_train_batch_size=MICRO, gradient_accumulation_steps=GLOBAL_MICROBATCHES // dp,
        max_steps=2, logging_steps=1, learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0,
        seed=7, report_to="none", save_strategy="no", disable_tqdm=True, load_weights_from=weights, schedule=schedule)
    trainer = merak.MerakTrainer(model, args, train_dataset=dataset(make_batch))
    trainer.train()
    trainer.save_model(export)
    return [e["loss"] for e in trainer.state.log_history if "loss" in e], read


@pytest.mark.parametrize("dp, schedule", [
    (2, "1f1b"),
    (1, "zb_v"),  # two model chunks per rank, GPT-2's embedding and head both on rank 0
    pytest.param(1, "interleaved_1f1b", marks=pytest.mark.slow)])
def test_import_hf_weights_train_and_export(dist_run, tmp_path, dp, schedule):
    from transformers import AutoModelForCausalLM, default_data_collator

    from merak.data import StepBatches

    model, make_batch = tiny_model("gpt2", seed=11)  # "pretrained" weights unlike the seed-0 init
    model.save_pretrained(tmp_path / "pretrained")
    batches = StepBatches(dataset(make_batch), default_data_collator, MICRO, GLOBAL_MICROBATCHES, 1, 0, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ref_curve, _ = single_process_run(model, [batches.microbatches(s) for s in range(2)], opt)

    per_rank = dist_run(_import_train_export, 2 * dp, str(tmp_path / "pretrained"), str(tmp_path / "export"), dp,
                        schedule, timeout=600)
    for curve, _ in per_rank:
        torch.testing.assert_close(curve, ref_curve, rtol=2e-5, atol=2e-6)  # first loss: weights imported right
    from safetensors import safe_open

    with safe_open(str(tmp_path / "pretrained" / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    reads = [set(per_rank[rank][1]) for rank in range(0, 2 * dp, dp)]  # data-parallel replica 0 of each stage
    assert set.union(*reads) == stored
    if schedule == "zb_v":  # both ends of the tie on rank 0: each rank reads only its own chunks' tensors
        assert not reads[0] & reads[1], reads[0] & reads[1]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    probe = make_batch(batch_size=2, seq_len=SEQ, seed=99)
    with torch.no_grad():
        torch.testing.assert_close(exported(**probe).logits, model(**probe).logits, rtol=1e-4, atol=1e-5)
