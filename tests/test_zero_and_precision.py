"""ZeRO-1 and mixed precision: parity with one process, real sharding, exact resume, bf16/fp16.

* ZeRO-1 (``zero_stage=1``) must not change the numbers: the loss curve equals the single-process
  AdamW run (fp32, tight tolerance) with dp=2 x pp=2 (tied embedding on two stages) and dp=2 x
  pp=1, while each DP rank holds the optimizer state of only its share of the parameters.
* Checkpoints under ZeRO-1 resume bitwise, also without ZeRO (the shards are merged by name).
* bf16 / fp16 autocast with fp32 master weights tracks the fp32 curve within 1% over 20 steps,
  the activations crossing the stage cut really are bf16, zero-bubble's deferred weight
  gradients work under autocast, and an fp16 overflow on one rank makes every rank skip the
  same step and halve the scale.
"""

from __future__ import annotations

import json

import pytest
import torch

from test_trainer import GLOBAL_MICROBATCHES, MICRO, SEQ, STEPS, dataset, single_process_curve
from tiny_models import tiny_model


def _trainer(dp: int, pp: int, out: str = "/tmp/merak-test-zero", steps: int = STEPS, tp: int = 1, **overrides):
    """The MerakTrainer of test_trainer's parity runs (AdamW, linear decay, clipping at 1), with
    ``overrides`` (zero_stage, bf16, fp16, schedule, checkpointing ...)."""
    import merak

    merak.init(dp=dp, tp=tp, pp=pp)
    model, make_batch = tiny_model("gpt2")
    options = dict(output_dir=out, per_device_train_batch_size=MICRO,
                   gradient_accumulation_steps=GLOBAL_MICROBATCHES // dp, max_steps=steps, logging_steps=1,
                   learning_rate=1e-2, lr_scheduler_type="linear", max_grad_norm=1.0, seed=7,
                   report_to="none", save_strategy="no", disable_tqdm=True)
    args = merak.MerakArguments(**{**options, **overrides})
    return merak.MerakTrainer(model, args, train_dataset=dataset(make_batch))


def _logged(trainer, *keys: str) -> list:
    return [tuple(e.get(k) for k in keys) if len(keys) > 1 else e[keys[0]]
            for e in trainer.state.log_history if "loss" in e]


# ---- ZeRO-1 ----------------------------------------------------------------------------------
def _zero_run(dp: int, pp: int) -> dict:
    from merak.runtime.memory.zero import is_sharded, local_optimizer

    trainer = _trainer(dp, pp, zero_stage=1)
    trainer.train()
    local = local_optimizer(trainer.optimizer)
    names = {id(p): n for n, p in trainer.stage.named_parameters()}
    held = {names[id(p)]: p.numel() for p, s in local.state.items() if s}
    return {"curve": _logged(trainer, "loss"), "sharded": is_sharded(trainer.optimizer),
            "stage": trainer.grid.stage_id, "held": held,
            "params": {n: p.numel() for n, p in trainer.stage.named_parameters()}}


# dp=2 x pp=1 runs ZeRO-1 in the default suite too, in the (fp16) resume test below.
@pytest.mark.parametrize("dp, pp", [pytest.param(2, 2, id="dp2-pp2"),
                                    pytest.param(2, 1, id="dp2-pp1", marks=pytest.mark.slow)])
def test_zero1_matches_single_process_and_shards_states(dist_run, dp, pp):
    ref = single_process_curve("gpt2")
    results = dist_run(_zero_run, dp * pp, dp, pp, timeout=600)
    for rank, r in enumerate(results):
        assert r["sharded"], f"rank {rank}: zero_stage=1 did not build a ZeRO optimizer"
        torch.testing.assert_close(r["curve"], ref, rtol=2e-5, atol=2e-6, msg=f"rank {rank}")
    for stage in range(pp):
        replicas = [r for r in results if r["stage"] == stage]
        params, largest = replicas[0]["params"], max(replicas[0]["params"].values())
        held = [r["held"] for r in replicas]
        assert set(held[0]).isdisjoint(held[1]), f"stage {stage}: a parameter's state lives on two DP ranks"
        assert set(held[0]) | set(held[1]) == set(params), f"stage {stage}: some parameters have no state"
        for h in held:  # the greedy partition: within one parameter of an even split
            assert sum(h.values()) <= sum(params.values()) / dp + largest, (stage, sum(h.values()))


def _resume_runs(out: str, resume: str | None, zero_stages: tuple[int, ...]) -> list[list[tuple]]:
    """One fresh trainer per entry of ``zero_stages``, each trained (or resumed) to step 6.

    fp16 with a huge first scale (overflow, skipped step, back-off) and a growth window of 3, so
    the loss scaler's state changes around the checkpoint and must be restored exactly."""
    logs = []
    for zero_stage in zero_stages:  # a resume restores every RNG: runs in one process are independent
        trainer = _trainer(2, 1, out, steps=6, zero_stage=zero_stage, fp16=True, fp16_initial_loss_scale=2.0**18,
                           fp16_loss_scale_window=3, save_strategy="steps", save_steps=3, warmup_steps=2,
                           log_throughput=True)  # puts loss_scale / skipped_steps into log_history
        trainer.train(resume_from_checkpoint=resume)
        logs.append(_logged(trainer, "step", "loss", "loss_scale", "skipped_steps", "grad_norm"))
    return logs


def test_zero1_checkpoint_resumes_bitwise_with_and_without_zero(dist_run, tmp_path):
    full = [logs[0] for logs in dist_run(_resume_runs, 2, str(tmp_path), None, (1,), timeout=600)]
    assert full[0] == full[1]
    assert [e[0] for e in full[0]] == [1, 2, 3, 4, 5, 6]
    assert full[0][-1][3] >= 1, f"the huge initial scale should have overflowed: {full[0]}"
    checkpoint = tmp_path / "checkpoint-3"
    from torch.distributed.checkpoint import FileSystemReader

    assert json.loads((checkpoint / "layout.json").read_text())["optimizer"] is True
    storage = FileSystemReader(str(checkpoint / "dcp")).read_metadata().storage_data
    names: dict[str, set[str]] = {}  # DCP file -> parameters whose optimizer states it holds
    for index, info in storage.items():
        if index.fqn.startswith("optim::"):
            names.setdefault(info.relative_path, set()).add(index.fqn.split("::")[1])
    shards = list(names.values())
    assert len(shards) == 2 and shards[0].isdisjoint(shards[1])  # each DP rank saved its own shard
    # Then without ZeRO, where every rank needs the whole state: both shards merged by name.
    for rank, (resumed, consolidated) in enumerate(dist_run(_resume_runs, 2, str(tmp_path), str(checkpoint),
                                                             (1, 0), timeout=600)):
        assert resumed == full[0], f"rank {rank}: resumed under ZeRO-1"
        assert consolidated == full[0], f"rank {rank}: resumed without ZeRO"


# ---- mixed precision ---------------------------------------------------------------------------
PRECISION_STEPS = 20


DEFAULT_RUNS = {"fp32": {}, "bf16": {"bf16": True}, "bf16-zb": {"bf16": True, "schedule": "zero_bubble"},
                "fp16": {"fp16": True}}


def _precision_runs(runs: dict[str, dict] = DEFAULT_RUNS, tp: int = 1, pp: int = 2) -> dict:
    """Loss curves of ``runs`` (name -> MerakArguments overrides) in one process group, with the
    dtypes of every floating tensor that crossed the stage cut."""
    out = {}
    for name, options in runs.items():
        trainer = _trainer(1, pp, tp=tp, steps=PRECISION_STEPS, **options)
        sent: set[torch.dtype] = set()
        p2p = trainer._pipeline_executor().p2p
        exchange = p2p.exchange  # every send (single or grouped) goes through it

        def recording_exchange(sends=(), *args, exchange=exchange, sent=sent, **kwargs):
            for message in sends:
                obj = message.obj
                values = obj.values() if isinstance(obj, dict) else [obj]
                sent.update(v.dtype for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())
            return exchange(sends, *args, **kwargs)

        p2p.exchange = recording_exchange
        trainer.train()
        out[name] = {"curve": _logged(trainer, "loss"), "sent": sent,
                     "param_dtypes": {p.dtype for p in trainer.stage.parameters()},
                     "skipped": trainer.precision.scaler.skipped_steps if trainer.precision.scaler else 0}
    return out


def test_bf16_and_fp16_track_fp32_with_fp32_master_weights(dist_run):
    per_rank = dist_run(_precision_runs, 2, timeout=900)
    assert per_rank[0]["fp32"]["curve"] == per_rank[1]["fp32"]["curve"]
    fp32 = torch.tensor(per_rank[0]["fp32"]["curve"])
    assert len(fp32) == PRECISION_STEPS and fp32[-1] < fp32[0]
    for rank, runs in enumerate(per_rank):
        assert runs["fp32"]["sent"] == {torch.float32}, runs["fp32"]["sent"]
        for name in ("bf16", "bf16-zb", "fp16"):
            run = runs[name]
            curve = torch.tensor(run["curve"])
            worst = float(((curve - fp32).abs() / fp32).max())
            assert worst < 0.01, f"rank {rank} {name}: loss off fp32 by {worst:.2%}"
            assert curve.ne(fp32).any(), f"{name} loss equals fp32 bitwise: autocast never ran"
            low = torch.float16 if name == "fp16" else torch.bfloat16
            assert run["sent"] == {low}, f"rank {rank} {name}: tensors crossing the cut were {run['sent']}"
            assert run["param_dtypes"] == {torch.float32}, "master weights must stay fp32"
        assert runs["fp16"]["skipped"] == 0


@pytest.mark.slow
def test_bf16_with_tensor_parallelism_and_recomputation(dist_run):
    """TP layers (their collectives move bf16) track fp32 within 1%; recomputation re-enters the
    forward under the same autocast, so it changes nothing at all."""
    tp = dist_run(_precision_runs, 2, {"fp32": {}, "bf16": {"bf16": True}}, 2, 1, timeout=900)[0]
    fp32, bf16 = torch.tensor(tp["fp32"]["curve"]), torch.tensor(tp["bf16"]["curve"])
    assert float(((bf16 - fp32).abs() / fp32).max()) < 0.01 and bf16.ne(fp32).any()
    runs = {"bf16": {"bf16": True}, "bf16-full": {"bf16": True, "recompute": "full"},
            "bf16-scp": {"bf16": True, "recompute": "full", "schedule": "shifted_critical_path"}}
    for rank, result in enumerate(dist_run(_precision_runs, 2, runs, timeout=900)):
        assert result["bf16-full"]["curve"] == result["bf16"]["curve"], rank
        assert result["bf16-scp"]["curve"] == result["bf16"]["curve"], rank


@pytest.mark.slow
def test_zero1_resume_with_tied_embedding_over_two_stages(dist_run, tmp_path):
    """dp=2 x pp=2, fp32: the tied embedding's state lives in two stages' ZeRO shards."""
    full = dist_run(_zero_checkpointed, 4, str(tmp_path), None, timeout=900)
    resumed = dist_run(_zero_checkpointed, 4, str(tmp_path), str(tmp_path / "checkpoint-3"), timeout=900)
    assert resumed == full and full[0] == full[-1] and len(full[0]) == 6


def _zero_checkpointed(out: str, resume: str | None) -> list[tuple]:
    trainer = _trainer(2, 2, out, steps=6, zero_stage=1, save_strategy="steps", save_steps=3)
    trainer.train(resume_from_checkpoint=resume)
    return _logged(trainer, "step", "loss", "grad_norm")


def _overflow_on_one_rank() -> list[dict]:
    """pp=2 executor with fp16: at step 1 only the *last* stage's gradient gets an inf (the first
    stage's gradients stay finite); every rank must skip step 1 and halve the scale."""
    import merak
    from merak.partitioner import build_stage, shard, trace
    from merak.runtime.pipeline.executor import PipelineExecutor
    from merak.runtime.memory.precision import MixedPrecision
    from merak.runtime.pipeline.schedule import build

    grid = merak.init(pp=2)
    model, make_batch = tiny_model("gpt2")
    stage = build_stage(shard(trace(model, make_batch(batch_size=MICRO, seq_len=SEQ, seed=0)), 2), grid.stage_id)
    precision = MixedPrecision.from_flags(fp16=True, scale=1024.0, growth_interval=1000)
    poison = {"step": -1}
    if grid.is_last_stage:
        tied = set(stage.tied_parameters.values())  # a tied gradient would reach stage 0 anyway
        last = [p for n, p in stage.named_parameters() if n not in tied][-1]
        last.register_hook(lambda g: g * float("inf") if poison["step"] == 1 else g)
    ex = PipelineExecutor(stage, grid, torch.optim.SGD(stage.parameters(), lr=0.1), precision=precision)
    instructions = build("1f1b", 2, 2, grid.stage_id)
    history = []
    for step in range(3):
        poison["step"] = step
        before = [p.detach().clone() for p in stage.parameters()]
        result = ex.run(instructions, [make_batch(batch_size=MICRO, seq_len=SEQ, seed=10 * step + i) for i in range(2)])
        changed = any(not torch.equal(b, p) for b, p in zip(before, stage.parameters()))
        history.append({"skipped": result.skipped, "scale": precision.scaler.scale, "changed": changed,
                        "grads_cleared": all(p.grad is None for p in stage.parameters())})
    return history


def test_fp16_overflow_on_one_rank_skips_the_step_everywhere(dist_run):
    for rank, history in enumerate(dist_run(_overflow_on_one_rank, 2)):
        assert [h["skipped"] for h in history] == [False, True, False], (rank, history)
        assert [h["scale"] for h in history] == [1024.0, 512.0, 512.0], (rank, history)
        assert [h["changed"] for h in history] == [True, False, True], (rank, history)
        assert all(h["grads_cleared"] for h in history), (rank, history)


# ---- units: scaler, flags, arguments -------------------------------------------------------------
def test_loss_scaler_backs_off_grows_and_round_trips():
    from merak.runtime.memory.precision import DynamicLossScaler

    scaler = DynamicLossScaler(scale=8.0, growth_interval=2, min_scale=2.0)
    for overflow in (True, False, False, True, True, True):
        scaler.update(overflow)
    # 8 -> 4 (overflow), 2 clean steps -> 8, then 4, 2, and 2 is the floor
    assert (scaler.scale, scaler.skipped_steps, scaler.good_steps) == (2.0, 4, 0)
    copy = DynamicLossScaler()
    copy.load_state_dict(json.loads(json.dumps(scaler.state_dict())))  # what a checkpoint's extra.json does
    assert copy == scaler
    with pytest.raises(ValueError, match="unknown loss-scaler state key"):
        copy.load_state_dict({"scael": 1.0})
    with pytest.raises(ValueError, match="positive finite"):
        DynamicLossScaler(scale=float("inf"))


def test_precision_flags_and_zero_arguments():
    import merak
    from merak.arguments import DeepSpeedConfigError
    from merak.runtime.memory.precision import MixedPrecision

    with pytest.raises(ValueError, match="exclusive"):
        MixedPrecision.from_flags(bf16=True, fp16=True)
    with pytest.raises(ValueError, match="only meaningful with fp16"):
        from merak.runtime.memory.precision import DynamicLossScaler

        MixedPrecision(torch.bfloat16, DynamicLossScaler())
    assert MixedPrecision().scale_loss(t := torch.ones(())) is t  # fp32: the loss itself, no multiply
    with pytest.raises(ValueError, match="zero_stage=2: Merak implements ZeRO stage 0 or 1"):
        merak.MerakArguments(output_dir="/tmp/x", report_to="none", zero_stage=2)
    args = merak.MerakArguments(output_dir="/tmp/x", report_to="none", deepspeed={
        "zero_optimization": {"stage": 1}, "fp16": {"enabled": True, "initial_scale_power": 12,
                                                    "loss_scale_window": 50, "min_loss_scale": 4}})
    assert (args.zero_stage, args.fp16, args.fp16_initial_loss_scale, args.fp16_loss_scale_window,
            args.fp16_min_loss_scale) == (1, True, 4096.0, 50, 4)
    with pytest.raises(DeepSpeedConfigError, match="static loss scale"):
        merak.MerakArguments(output_dir="/tmp/x", report_to="none",
                             deepspeed={"fp16": {"enabled": True, "loss_scale": 128}})


def test_zero_bubble_deferred_weight_gradients_under_autocast():
    """The patched Linear behaves as autocast's own: bf16 output, fp32 weight gradient."""
    import copy

    from merak.runtime.pipeline.weight_grad_store import WeightGradStore, defer_weight_gradients

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    patched, store = copy.deepcopy(reference), WeightGradStore()
    defer_weight_gradients(patched, store)
    x = torch.randn(5, 8)
    outputs = []
    for model in (reference, patched):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        outputs.append(y)
        with store.deferring(0):
            (y.float() ** 2).sum().backward()
    assert outputs[1].dtype == torch.bfloat16
    assert patched[0].weight.grad is None  # deferred to W
    assert store.flush(0) == 2
    torch.testing.assert_close(outputs[1], outputs[0], rtol=2e-2, atol=2e-2)
    for (name, p), q in zip(reference.named_parameters(), patched.parameters()):
        assert q.grad.dtype == torch.float32, name
        torch.testing.assert_close(q.grad, p.grad, rtol=3e-2, atol=3e-2, msg=name)
