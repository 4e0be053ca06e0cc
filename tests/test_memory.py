"""Memory estimator, budget planner and offload chooser (runtime.memory, runtime.memory_planner).

The estimator is checked against measurements of the real built stages: saved activations per
stage under every recompute mode (counted with autograd's saved-tensor hooks and by storage
liveness, deduplicated by storage, as the estimator does), parameter / gradient / optimizer bytes
after a real optimizer step (also under ZeRO-1 and tensor parallelism).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import pytest
import torch

from tiny_models import tiny_model

from merak.partitioner import build_stage, shard, trace
from merak.partitioner.meta import meta_like
from merak.runtime.memory.activation_profile import (RetainedStorageMeter, SavedTensorCounter, profile_saved_tensors,
                                             stage_footprints)
from merak.runtime.memory.policy import ActivationPlan, LayerAction
from merak.runtime.memory.estimator import Layout, MemoryModel, estimate_memory, main, parse_bytes
from merak.runtime.memory.planner import MemoryBudgetError, plan_activations
from merak.runtime.memory.stage_activations import StageActivations

MICRO, SEQ = 2, 16


@lru_cache(maxsize=None)
def _pipeline(kind: str, stages: int, layers: int = 4, meta: bool = False, method: str = "cost", **overrides):
    key = "n_layer" if kind == "gpt2" else "num_hidden_layers"
    model, make_batch = tiny_model(kind, meta=meta, **{key: layers}, **overrides)
    batch = make_batch(batch_size=MICRO, seq_len=SEQ)
    graph = trace(model, {k: meta_like(v) for k, v in batch.items()})
    return model, batch, shard(graph, stages, method=method)


def _stage_inputs(plan, batch):
    """Built stages and what each receives, from one no-grad pass through the pipeline."""
    stages = [build_stage(plan, s) for s in range(plan.num_stages)]
    received, inputs = {}, []
    for stage in stages:
        inputs.append(received)
        with torch.no_grad():
            out = stage({k: batch[k] for k in stage.data_inputs}, received)
        received = {n: out[n] for n in stage.send_outputs}
    return stages, inputs


def _measure(stage, actions, data, received, *, materialize: bool = False) -> int:
    """Bytes one micro-batch leaves alive for its backward on a real stage with ``actions``
    applied (fresh copies of the inputs, as the executor holds them)."""
    data = {k: v.clone() for k, v in data.items()}
    received = {k: v.detach().clone().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v
                for k, v in received.items()}
    runner = StageActivations(stage, actions)
    meter = RetainedStorageMeter([*stage.parameters(), *stage.buffers()],
                                 [*data.values(), *(v for v in received.values() if isinstance(v, torch.Tensor))])
    with meter:
        out = runner.forward(0, True, data, received)
        if materialize:
            runner.recompute(0)
    roots = [v.grad_fn for v in out.values() if isinstance(v, torch.Tensor) and v.grad_fn is not None]  # noqa: F841
    del out, data, received
    return meter.alive_bytes()


# ---- saved activations: estimate vs measurement -----------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["none", "full", "selective", "stage_aware"])
def test_estimated_activations_match_measured_per_stage(kind, mode):
    model, batch, plan = _pipeline(kind, 2)
    stages, inputs = _stage_inputs(plan, batch)
    footprints = stage_footprints(plan)
    activation_plan = ActivationPlan.from_mode(mode, plan)
    for s, stage in enumerate(stages):
        actions, fp = activation_plan.actions(s), footprints[s]
        data = {k: batch[k] for k in stage.data_inputs}
        for materialized in (False, True):
            measured = _measure(stage, actions, data, inputs[s], materialize=materialized)
            estimated = fp.nbytes(fp.retained(actions, materialized=materialized))
            assert abs(estimated - measured) <= 0.10 * measured, (kind, mode, s, materialized, estimated, measured)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_liveness_meter_agrees_with_saved_tensor_hooks(kind):
    """The two ways of measuring agree where both apply (keep everything, no received inputs)."""
    model, batch, plan = _pipeline(kind, 2)
    stage = build_stage(plan, 0)
    data = {k: batch[k].clone() for k in stage.data_inputs}
    with SavedTensorCounter.for_module(stage) as hooks:
        stage(data, {})
    assert hooks.nbytes == _measure(stage, {}, data, {}) > 0


@pytest.mark.parametrize("kind,attn", [("gpt2", "eager"), ("llama", "eager"), ("llama", "sdpa")])
def test_meta_profile_counts_what_autograd_saves(kind, attn):
    """One meta forward of the graph saves what a real run of the same graph saves (with sdpa:
    costed as the fused CPU/GPU kernels, not the meta math fallback)."""
    model, batch, plan = _pipeline(kind, 1, attn_implementation=attn)
    stage = build_stage(plan, 0)
    with SavedTensorCounter.for_module(stage) as hooks:
        stage({k: batch[k] for k in stage.data_inputs}, {})
    assert profile_saved_tensors(plan.graph).total_saved_bytes() == hooks.nbytes


def test_bf16_estimate_matches_autocast():
    """LLaMA casts its norms and softmax to float32 explicitly, so CPU autocast and the CUDA rules
    the estimator emulates agree on it: the estimate equals a real CPU autocast run."""
    model, batch, plan = _pipeline("llama", 1)
    stage = build_stage(plan, 0)
    with SavedTensorCounter.for_module(stage) as hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        stage({k: batch[k] for k in stage.data_inputs}, {})
    bf16, fp32 = stage_footprints(plan, "bf16")[0], stage_footprints(plan, "fp32")[0]
    assert bf16.nbytes(bf16.retained({})) == hooks.nbytes != fp32.nbytes(fp32.retained({}))


def test_activation_peak_follows_the_schedule():
    """Keeping everything under 1F1B, stage s holds min(P - s, M) micro-batches (each with the
    values it received and its outputs); GPipe holds all M on every stage."""
    _, _, plan = _pipeline("gpt2", 4, layers=8, meta=True)
    for schedule, m in (("1f1b", 8), ("gpipe", 3)):
        layout = Layout(pp=4, micro_batch_size=MICRO, num_microbatches=m, schedule=schedule)
        model = MemoryModel(plan, layout)
        for s, est in enumerate(model.estimate(ActivationPlan.from_mode("none", plan))):
            fp = model.footprints[s]
            inflight = min(4 - s, m) if schedule == "1f1b" else m
            assert est.peak_inflight == inflight
            assert est.activation_bytes == inflight * fp.nbytes(fp.retained({}) | fp.outputs)


# ---- static bytes ---------------------------------------------------------------------------------
def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum", "sgd"])
def test_static_bytes_are_exact(optimizer):
    model, batch, plan = _pipeline("gpt2", 2)
    stages, inputs = _stage_inputs(plan, batch)
    estimates = estimate_memory(plan, Layout(pp=2, micro_batch_size=MICRO, optimizer=optimizer))
    for s, stage in enumerate(stages):
        params = [p for p in stage.parameters()]
        make = {"adamw": lambda: torch.optim.AdamW(params, lr=1e-3),
                "sgd_momentum": lambda: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
                "sgd": lambda: torch.optim.SGD(params, lr=1e-3)}[optimizer]
        opt = make()
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        assert estimates[s].params_bytes == sum(p.numel() * p.element_size() for p in params)
        assert estimates[s].grads_bytes == sum(p.grad.numel() * p.grad.element_size() for p in params)
        assert estimates[s].optimizer_bytes == _state_bytes(opt)


def _sharded_static_bytes() -> dict[str, int]:
    """On 2 ranks: the fullest rank's AdamW states under ZeroRedundancyOptimizer, and one TP rank's
    parameter bytes after the automatic tensor-parallel plan is applied."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import merak
    from merak.runtime.tensor_parallel import apply_tensor_parallel, plan_tensor_parallel

    grid = merak.init(tp=2)
    model, batch, plan = _pipeline("gpt2", 1)
    stage = build_stage(plan, 0)
    params = list(stage.parameters())
    zero = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    zero.step()
    local = torch.tensor([_state_bytes(zero.optim)])
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    tp_stage = build_stage(plan, 0)
    apply_tensor_parallel(tp_stage, grid, plan_tensor_parallel(plan.graph, 2))
    tp_params = sum(p.numel() * p.element_size() for p in tp_stage.parameters())
    merak.shutdown()
    return {"zero_max_optimizer_bytes": int(local.item()), "tp_params_bytes": tp_params}


def test_zero1_and_tensor_parallel_static_bytes_are_exact(dist_run):
    measured = dist_run(_sharded_static_bytes, 2, timeout=300)
    _, _, plan = _pipeline("gpt2", 1)
    zero = estimate_memory(plan, Layout(dp=2, micro_batch_size=MICRO, zero_stage=1))[0]
    tp = estimate_memory(plan, Layout(tp=2, micro_batch_size=MICRO))[0]
    full = estimate_memory(plan, Layout(micro_batch_size=MICRO))[0]
    assert zero.optimizer_bytes == measured[0]["zero_max_optimizer_bytes"] < full.optimizer_bytes
    assert [tp.params_bytes] * 2 == [r["tp_params_bytes"] for r in measured]
    assert tp.params_bytes < full.params_bytes


# ---- the budget planner ---------------------------------------------------------------------------------
PLANNER_LAYOUT = Layout(pp=4, micro_batch_size=MICRO, num_microbatches=8)


@lru_cache(maxsize=None)
def _planner_model() -> tuple[object, MemoryModel]:
    """Two GPT-2 blocks per stage (uniform cuts), so stages differ only in micro-batches in flight
    (and the embeddings / head at the ends)."""
    _, _, plan = _pipeline("gpt2", 4, layers=8, meta=True, method="uniform")
    return plan, MemoryModel(plan, PLANNER_LAYOUT)


def _stage_aware_budget(memory: MemoryModel) -> int:
    """A budget stage 0 meets only by recomputing, that the last stage meets keeping everything."""
    plan = memory.plan
    full = memory.estimate(ActivationPlan.from_mode("full", plan))
    none = memory.estimate(ActivationPlan.from_mode("none", plan))
    return max(max(m.total_bytes for m in full), none[-1].total_bytes,
               (full[0].total_bytes + none[0].total_bytes) // 2)


def test_budget_planner_recomputes_fewest_layers_and_less_on_later_stages():
    plan, memory = _planner_model()
    budget = _stage_aware_budget(memory)
    chosen = plan_activations(plan, PLANNER_LAYOUT, "stage_aware", budget, memory=memory)
    counts = [len(chosen.actions(s)) for s in range(plan.num_stages)]
    assert counts[0] > 0 and counts[-1] == 0 and counts == sorted(counts, reverse=True), counts
    for s, estimate in enumerate(memory.estimate(chosen)):
        assert estimate.total_bytes <= budget
        names = chosen.stage_layer_names(s)
        assert set(chosen.actions(s)) == set(names[:counts[s]])  # earliest layers first
        if counts[s]:  # one layer fewer does not fit
            fewer = ActivationPlan(tuple({n: LayerAction.RECOMPUTE for n in names[:counts[s] - 1]} if t == s else {}
                                         for t in range(plan.num_stages)), chosen.layers)
            assert memory.stage_memory(fewer, s).total_bytes > budget


def test_impossible_budget_names_the_smallest_budget_that_fits():
    plan, memory = _planner_model()
    with pytest.raises(MemoryBudgetError) as info:
        plan_activations(plan, PLANNER_LAYOUT, "stage_aware", 10_000, memory=memory)
    smallest = info.value.min_budget_bytes
    message = str(info.value)
    assert f"({smallest} bytes)" in message and "pipeline stages (pp)" in message and "micro-batch" in message
    feasible = plan_activations(plan, PLANNER_LAYOUT, "stage_aware", smallest, memory=memory)
    assert max(m.total_bytes for m in memory.estimate(feasible)) <= smallest
    with pytest.raises(MemoryBudgetError):
        plan_activations(plan, PLANNER_LAYOUT, "stage_aware", smallest - 1, memory=memory)


def test_fixed_modes_are_checked_against_the_budget():
    plan, memory = _planner_model()
    none_need = max(m.total_bytes for m in memory.estimate(ActivationPlan.from_mode("none", plan)))
    assert plan_activations(plan, PLANNER_LAYOUT, "none", none_need, memory=memory) == ActivationPlan.from_mode("none", plan)
    with pytest.raises(MemoryBudgetError, match="recompute='stage_aware'") as info:
        plan_activations(plan, PLANNER_LAYOUT, "none", none_need - 1, memory=memory)
    assert info.value.min_budget_bytes == none_need
    assert plan_activations(plan, PLANNER_LAYOUT, "full", None) == ActivationPlan.from_mode("full", plan)


def test_offload_chooser_follows_the_host_link_bandwidth():
    plan, memory = _planner_model()
    budget = _stage_aware_budget(memory)
    fast = plan_activations(plan, PLANNER_LAYOUT, "stage_aware", budget, offload=True,
                            host_link_bytes_per_s=1e18, memory=memory)
    slow = plan_activations(plan, PLANNER_LAYOUT, "stage_aware", budget, offload=True,
                            host_link_bytes_per_s=1e3, memory=memory)
    fast_actions = {a for s in range(plan.num_stages) for a in fast.actions(s).values()}
    slow_actions = {a for s in range(plan.num_stages) for a in slow.actions(s).values()}
    assert fast_actions == {LayerAction.OFFLOAD} and slow_actions == {LayerAction.RECOMPUTE}
    for chosen in (fast, slow):
        assert max(m.total_bytes for m in memory.estimate(chosen)) <= budget
    with pytest.raises(ValueError, match="budget"):
        plan_activations(plan, PLANNER_LAYOUT, "stage_aware", None, offload=True)


def test_parse_bytes():
    assert parse_bytes("80GB") == parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("512MB") == 512 * 2**20 and parse_bytes(1234) == 1234
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


# ---- CLI ---------------------------------------------------------------------------------------------
CLI = ["--config", "gpt2", "n_layer=4", "n_embd=64", "n_head=4", "vocab_size=128", "n_positions=64",
       "--pp", "2", "--microbatches", "4", "--micro-batch-size", "2", "--seq", "32"]


def test_cli_text_and_json(capsys):
    assert main([*CLI, "--recompute", "stage_aware", "--precision", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "GPT2LMHeadModel" in text and "optimizer" in text and len(re.findall(r"^\s+[01]\s", text, re.M)) == 2
    assert main([*CLI, "--recompute", "full", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["stages"]) == 2
    for stage in out["stages"]:
        assert {"params_bytes", "grads_bytes", "optimizer_bytes", "activation_bytes", "total_bytes",
                "recomputed_layers"} <= set(stage)
        assert stage["recomputed_layers"] == stage["layers"]
        assert stage["total_bytes"] >= stage["params_bytes"] + stage["activation_bytes"]


def test_cli_refuses_an_impossible_budget(capsys):
    assert main([*CLI, "--recompute", "stage_aware", "--budget", "1000"]) == 3
    assert "smallest budget that fits" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_plans_llama2_7b_on_8_gpus_without_weights(capsys):
    llama = ["--config", "llama", "hidden_size=4096", "intermediate_size=11008", "num_hidden_layers=32",
             "num_attention_heads=32", "num_key_value_heads=32", "vocab_size=32000",
             "max_position_embeddings=4096"]
    assert main([*llama, "--tp", "2", "--pp", "4", "--microbatches", "32", "--seq", "4096",
                 "--recompute", "stage_aware", "--budget", "80GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(s["total_bytes"] <= 80 * 2**30 for s in out["stages"]) and out["seconds"] < 120


# ---- virtual stages: a rank is the sum of its chunks ----------------------------------------------------
ZB_V_LAYOUT = Layout(pp=2, micro_batch_size=MICRO, num_microbatches=4, schedule="zb_v")


@lru_cache(maxsize=None)
def _chunked_model() -> tuple[object, MemoryModel]:
    """GPT-2 (tied embedding and head) with 8 blocks cut into the 4 chunks of zb_v at pp=2, two
    blocks each: rank 0 holds virtual stages 0 and 3, rank 1 stages 1 and 2."""
    _, _, plan = _pipeline("gpt2", 4, layers=8, meta=True, method="uniform")
    return plan, MemoryModel(plan, ZB_V_LAYOUT)


def test_virtual_stage_rank_is_priced_chunk_by_chunk():
    from merak.runtime.memory.estimator import static_bytes

    plan, memory = _chunked_model()
    assert memory.per_chunk and memory.stages_of(0) == [0, 3] and memory.stages_of(1) == [1, 2]
    none = memory.estimate(ActivationPlan.from_mode("none", plan))
    assert len(none) == 2
    # parameters: both chunks of a rank, the embedding rank 0's two chunks share counted once
    wte = plan.graph.model.get_parameter("transformer.wte.weight")
    chunk_params = [static_bytes(plan, k, ZB_V_LAYOUT)[0] for k in range(4)]
    assert none[0].params_bytes == chunk_params[0] + chunk_params[3] - wte.numel() * wte.element_size()
    assert none[1].params_bytes == chunk_params[1] + chunk_params[2]
    # activations, from zb_v's order on rank 0 (in flight: 4 of chunk 0, 1 of chunk 1): f0 f0 f0 f1 ... f0,
    # so the peak is max(3 micro-batches of chunk 0 + 1 of chunk 1, 4 of chunk 0), each its own size
    fps = memory.footprints
    full = [fp.nbytes(fp.retained({}) | fp.outputs) for fp in fps]
    assert none[0].activation_bytes == max(3 * full[0] + full[3], 4 * full[0])
    assert none[0].peak_inflight == 4


def test_layout_knows_the_chunks_of_its_schedule():
    assert Layout(pp=2, schedule="interleaved_1f1b", num_chunks=3).placement.num_virtual == 6
    assert ZB_V_LAYOUT.placement.chunks_of(0) == [0, 3]
    with pytest.raises(ValueError, match="one chunk per stage"):
        Layout(pp=2, schedule="1f1b", num_chunks=3)
    _, memory = _chunked_model()
    with pytest.raises(ValueError, match="pp x chunks"):
        MemoryModel(memory.plan, Layout(pp=2, micro_batch_size=MICRO, num_microbatches=4,
                                        schedule="interleaved_1f1b", num_chunks=3))


def test_budget_planner_recomputes_per_chunk_until_each_rank_fits():
    plan, memory = _chunked_model()
    none = max(m.total_bytes for m in memory.estimate(ActivationPlan.from_mode("none", plan)))
    full = max(m.total_bytes for m in memory.estimate(ActivationPlan.from_mode("full", plan)))
    budget = (none + full) // 2
    chosen = plan_activations(plan, ZB_V_LAYOUT, "stage_aware", budget, memory=memory)
    counts = [len(chosen.actions(k)) for k in range(plan.num_stages)]
    assert 0 < sum(counts) < sum(len(chosen.stage_layer_names(k)) for k in range(plan.num_stages)), counts
    assert all(m.total_bytes <= budget for m in memory.estimate(chosen))
    for k in range(plan.num_stages):  # each chunk recomputes its earliest layers
        names = chosen.stage_layer_names(k)
        assert set(chosen.actions(k)) == set(names[:counts[k]])
    with pytest.raises(ValueError, match="not yet per model chunk"):
        plan_activations(plan, ZB_V_LAYOUT, "stage_aware", budget, offload=True, memory=memory)


def test_impossible_budget_with_chunks_names_the_smallest_budget_that_fits():
    plan, memory = _chunked_model()
    with pytest.raises(MemoryBudgetError) as info:
        plan_activations(plan, ZB_V_LAYOUT, "stage_aware", 10_000, memory=memory)
    smallest = info.value.min_budget_bytes
    assert "pipeline rank" in str(info.value) and "virtual stages" in str(info.value)
    assert "activation_offload" not in str(info.value)  # not planned per chunk: not offered as the fix
    feasible = plan_activations(plan, ZB_V_LAYOUT, "stage_aware", smallest, memory=memory)
    assert max(m.total_bytes for m in memory.estimate(feasible)) <= smallest
    with pytest.raises(MemoryBudgetError):
        plan_activations(plan, ZB_V_LAYOUT, "stage_aware", smallest - 1, memory=memory)


# ---- trainer ---------------------------------------------------------------------------------------------
def _trainer_with_budgets() -> dict[str, object]:
    """An infeasible budget is refused while the trainer is built; the smallest feasible one it
    names then trains, with the planner's per-stage recomputation."""
    import merak

    merak.init(pp=2)
    model, make_batch = tiny_model("gpt2")
    data = [{k: v[0] for k, v in make_batch(batch_size=1, seq_len=8, seed=i).items()} for i in range(16)]

    def args(budget: str) -> merak.MerakArguments:
        return merak.MerakArguments(output_dir="/tmp/merak-test-memory", per_device_train_batch_size=2,
                                    gradient_accumulation_steps=4, max_steps=2, report_to="none",
                                    save_strategy="no", disable_tqdm=True, recompute="stage_aware",
                                    max_memory_per_device=budget)

    with pytest.raises(MemoryBudgetError) as refused:
        merak.MerakTrainer(model, args("4096"), train_dataset=data)
    trainer = merak.MerakTrainer(model, args(str(refused.value.min_budget_bytes)), train_dataset=data)
    plan = trainer._activation_plan()
    loss = trainer.train().training_loss
    merak.shutdown()
    return {"error": str(refused.value), "recomputed": [len(plan.actions(s)) for s in range(plan.num_stages)],
            "loss": loss}


def test_trainer_refuses_an_infeasible_budget_on_every_rank(dist_run):
    ranks = dist_run(_trainer_with_budgets, 2, timeout=300)
    assert ranks[0]["error"] == ranks[1]["error"] and "smallest budget that fits" in ranks[0]["error"]
    assert ranks[0]["recomputed"] == ranks[1]["recomputed"] and ranks[0]["recomputed"][0] > 0
    assert torch.isfinite(torch.tensor([r["loss"] for r in ranks])).all()
