"""Virtual-stage schedules (interleaved 1F1B, ZB-V, DualPipeV) end to end: the partitioner cuts
``P·v`` chunks, each rank runs its chunks under the schedule, and the loss and gradients match
one process running the whole model (fp32, 1e-5), with and without recomputation.

GPT-2 ties its embedding to the LM head: under the V placement both sit on rank 0 (one
Parameter, no reduction); under the loop placement on the first and the last rank (reduced
over the tie group). One process group per layout runs every schedule in turn.
"""

from __future__ import annotations

import pytest
import torch

from test_pipeline_parity import LR, MICRO, SEQ, global_batches, reference
from tiny_models import tiny_model

#: (schedule, recompute, chunks per rank).
CASES = [("interleaved_1f1b", "none", 2), ("interleaved_1f1b", "full", 2),
         ("zb_v", "none", 2), ("zb_v", "full", 2),
         ("dualpipe_v", "none", 2), ("dualpipe_v", "full", 2)]
STEPS = 3


def _pipeline(kind: str, pp: int, m: int, cases: list[tuple[str, str, int]]) -> dict:
    import merak
    from merak.partitioner import build_chunks, shard, trace
    from merak.runtime.memory.recompute_plan import RecomputePlan
    from merak.runtime.pipeline.executor import PipelineExecutor, all_reduce_mean_loss
    from merak.runtime.pipeline.schedule import build, placement_for, uses_weight_passes

    grid = merak.init(pp=pp)
    out = {}
    for schedule, recompute, chunks in cases:
        placement = placement_for(schedule, pp, chunks)
        model, make_batch = tiny_model(kind)  # same seed on every rank: same weights
        plan = shard(trace(model, make_batch(batch_size=MICRO, seq_len=SEQ, seed=0)), placement.num_virtual)
        stages = build_chunks(plan, placement.chunks_of(grid.stage_id))
        params = {id(p): p for s in stages for p in s.parameters()}
        grads: dict[str, torch.Tensor] = {}

        def keep_first_grads() -> None:  # keyed by the reference model's parameter names
            if grads:
                return
            for s in stages:
                canonical = {local: key for key, local in s.tied_parameters.items()}
                grads.update({canonical.get(n, n): p.grad.clone() for n, p in s.named_parameters()})

        ex = PipelineExecutor(stages, grid, torch.optim.SGD(params.values(), lr=LR),
                              zero_bubble=uses_weight_passes(schedule), before_optimizer_step=keep_first_grads,
                              placement=placement)
        instructions = build(schedule, pp, m, grid.stage_id, RecomputePlan.from_mode(recompute, pp), chunks)
        losses = [all_reduce_mean_loss(ex.run(instructions, global_batches(make_batch, m, step)).loss, grid)
                  for step in range(STEPS)]
        out[(schedule, recompute, chunks)] = (losses, grads)
    return out


LAYOUTS = [
    pytest.param("gpt2", 2, CASES, id="gpt2-pp2"),
    pytest.param("llama", 2, CASES, id="llama-pp2", marks=pytest.mark.slow),
    pytest.param("gpt2", 4, CASES, id="gpt2-pp4", marks=pytest.mark.slow),
    pytest.param("llama", 4, CASES, id="llama-pp4", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind, pp, cases", LAYOUTS)
def test_virtual_stages_match_single_process(dist_run, kind, pp, cases):
    m = 2 * pp  # the fewest micro-batches every virtual-stage schedule takes
    ref_losses, ref_grads = reference(kind, m, STEPS)
    per_rank = dist_run(_pipeline, pp, kind, pp, m, cases, timeout=900)
    for rank, results in enumerate(per_rank):
        seen = set()
        for key, (losses, grads) in results.items():
            torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, msg=f"{key} rank {rank}")
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6,
                                           msg=f"{key} rank {rank} grad of {name}")
            seen |= set(grads)
        assert seen, f"rank {rank} owns no parameters"


# ---- tensor parallelism inside the chunks, through MerakTrainer ------------------------------------
def _tp_reference() -> tuple[list[float], dict[str, torch.Tensor], float]:
    """One process: the loss curve, first-step gradients and final evaluation loss (on the
    trainer's 8 evaluation samples) of test_trainer's recipe (AdamW, linear decay, clipping at 1)."""
    from test_trainer import GLOBAL_MICROBATCHES, MICRO as TRAIN_MICRO, STEPS as TRAIN_STEPS, dataset
    from transformers import default_data_collator, get_linear_schedule_with_warmup

    from merak.data import StepBatches
    from reference import single_process_run

    model, make_batch = tiny_model("gpt2")
    batches = StepBatches(dataset(make_batch), default_data_collator, TRAIN_MICRO, GLOBAL_MICROBATCHES, 1, 0, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    curve, grads = single_process_run(model, [batches.microbatches(s) for s in range(TRAIN_STEPS)], opt,
                                      scheduler=get_linear_schedule_with_warmup(opt, 0, TRAIN_STEPS), max_grad_norm=1.0)
    with torch.no_grad():  # equal-length samples: the token mean of the batch of 8 is this mean
        samples = dataset(make_batch, 8)
        evaluation = torch.stack([model(**default_data_collator(samples[i:i + 2])).loss for i in range(0, 8, 2)])
    return curve, grads, float(evaluation.mean())


def _tp_virtual_job(schedules: tuple[str, ...]) -> dict:
    """tp=2 x pp=2, each schedule in turn: the loss curve, the first step's gradients (before
    clipping; each TP rank's own shard, with its spec) and the evaluation loss."""
    import merak
    from test_trainer import GLOBAL_MICROBATCHES, MICRO as TRAIN_MICRO, STEPS as TRAIN_STEPS, dataset

    from merak.train_state import stage_tensors

    grid = merak.init(tp=2, pp=2)
    out: dict = {"tp_rank": grid.coord.tp}
    for schedule in schedules:
        grads: dict = {}

        class Recording(merak.MerakTrainer):
            def _before_optimizer_step(self) -> bool:
                if not grads:
                    grads.update({t.name: (t.tensor.grad.clone(), t.spec) for t in stage_tensors(self.stage)
                                  if t.tensor.grad is not None})
                return super()._before_optimizer_step()

        model, make_batch = tiny_model("gpt2")
        args = merak.MerakArguments(
            output_dir="/tmp/merak-test-tp-virtual", per_device_train_batch_size=TRAIN_MICRO,
            gradient_accumulation_steps=GLOBAL_MICROBATCHES, max_steps=TRAIN_STEPS, logging_steps=1,
            learning_rate=1e-2, lr_scheduler_type="linear", max_grad_norm=1.0, seed=7, report_to="none",
            save_strategy="no", schedule=schedule, disable_tqdm=True)
        trainer = Recording(model, args, train_dataset=dataset(make_batch), eval_dataset=dataset(make_batch, 8))
        trainer.train()
        out[schedule] = {"curve": [e["loss"] for e in trainer.state.log_history if "loss" in e], "grads": grads,
                         "sharded": len(trainer.stage.tp_param_specs), "eval": trainer.evaluate()["eval_loss"]}
    return out


def _assert_tp_virtual(per_rank: list[dict], schedules: tuple[str, ...]) -> None:
    ref_curve, ref_grads, ref_eval = _tp_reference()
    for schedule in schedules:
        seen: set[str] = set()
        for rank, results in enumerate(per_rank):
            res = results[schedule]
            assert res["sharded"] > 0, f"{schedule} rank {rank}: nothing was sharded"
            torch.testing.assert_close(res["curve"], ref_curve, rtol=1e-5, atol=1e-6, msg=f"{schedule} rank {rank}")
            for name, (grad, spec) in res["grads"].items():
                want = ref_grads[name] if spec is None else spec.local(ref_grads[name], results["tp_rank"])
                torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6, msg=f"{schedule} rank {rank} grad {name}")
            seen |= set(res["grads"])
            assert res["eval"] == pytest.approx(ref_eval, rel=1e-5), (schedule, rank, res["eval"], ref_eval)
        assert seen == set(ref_grads), f"{schedule}: parameters without a gradient: {set(ref_grads) - seen}"


@pytest.mark.parametrize("schedules", [
    pytest.param(("zb_v",), id="zb_v"),  # the V: embedding and head tied inside rank 0
    pytest.param(("interleaved_1f1b", "dualpipe_v"), id="interleaved+dualpipe_v", marks=pytest.mark.slow)])
def test_tensor_parallel_chunks_match_single_process(dist_run, schedules):
    """tp=2 x pp=2 with two model chunks per rank (tensor parallelism applied per chunk): the
    trainer's loss curve and first-step gradients equal one process's (fp32, 1e-5). Under zb_v
    rank 0 holds GPT-2's embedding and LM head in two chunks: one vocab-parallel shard, shared."""
    per_rank = dist_run(_tp_virtual_job, 4, schedules, timeout=900)
    _assert_tp_virtual(per_rank, schedules)
