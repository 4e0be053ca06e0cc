"""Tensor parallelism beyond the plain tiny kinds: mixture-of-experts banks, torch.export graphs,
and every decoder family of the installed transformers.

* MoE plans (single process): an expert bank is one opaque graph node; ``moe="tensor"`` splits
  every expert's feed-forward per block, ``moe="expert"`` gives each rank whole experts; banks
  that a mode cannot shard are refused up front, naming the module and the other mode.
* The partitioner CLI prints the TP plan of a model it traced with torch.export.
* Families (gloo ranks, tp=2): each decoder family either trains with parity (losses of two SGD
  steps and every first-step gradient shard equal the single-process ones) or is refused at plan
  time with a message that names what blocks it and the fix -- never an error in a step. A family
  whose tiny config cannot be built or run on one process is skipped, one the partitioner cannot
  trace is reported as untraceable (a limit of tracing that pipeline parallelism shares). The
  default run takes a few families; ``-m slow`` enumerates every family transformers registers
  for causal LM (``MERAK_FAMILIES=a,b`` picks some).
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch import nn

from tiny_models import FamilyUnavailable, decoder_families, tiny_family, tiny_model

#: words a refusal must contain: it names a fix (a mapping, a valid tp, the other MoE mode, a leaf)
FIX_WORDS = ("tp_mapping", "valid tp", "tp=1", "moe_parallel", "leaf_modules")
#: families of the default run: dense GQA, a MoE bank with shared experts, a fused-qkv family
FAST_FAMILIES = ("qwen2", "qwen2_moe", "phi3")


# ---- mixture-of-experts plans ----------------------------------------------------------------------
def _mixtral_graph():
    from merak.partitioner import trace

    model, make_batch = tiny_model("mixtral")
    return trace(model, make_batch(batch_size=4, seq_len=8))


def test_moe_bank_is_one_node_planned_inside_experts_or_over_ranks():
    from merak.runtime.tensor_parallel import plan_tensor_parallel

    graph = _mixtral_graph()
    assert graph.flavour == "fx"  # the bank is a leaf, so fx traces Mixtral (no export fallback)
    banks = [n for n in graph.graph.nodes if n.op == "call_module" and str(n.target).endswith("mlp.experts")]
    assert len(banks) == 2
    tensor = plan_tensor_parallel(graph, 2)
    bank = tensor.experts["model.layers.0.mlp.experts"]
    assert bank.mode == "tensor" and bank.top_k == 2
    assert bank.specs["gate_up_proj"].dim == 1 and bank.specs["gate_up_proj"].blocks == (64, 64)
    assert bank.specs["down_proj"].dim == 2
    assert "model.layers.0.mlp.gate" in tensor.unmatched  # the router stays replicated
    expert = plan_tensor_parallel(graph, 2, moe="expert")
    assert {s.dim for s in expert.experts["model.layers.1.mlp.experts"].specs.values()} == {0}
    assert "experts 4 -> 2 per rank" in expert.table()
    kept = plan_tensor_parallel(graph, 2, ["*.mlp.experts=replicate"])
    assert not kept.experts


def test_sub_microbatches_are_refused_up_front_when_a_router_loss_couples_the_batch():
    from merak.partitioner import build_stage, shard
    from merak.runtime.tensor_parallel import TPError, apply_tensor_parallel, plan_tensor_parallel

    graph = _mixtral_graph()
    plan = plan_tensor_parallel(graph, 2)
    assert "load-balancing loss" in plan.batch_coupled
    grid = type("FakeGrid", (), {"dims": type("D", (), {"tp": 2})(), "tp_group": None,
                                 "coord": type("C", (), {"tp": 0})()})()
    with pytest.raises(TPError, match=r"tp_sub_microbatches=2 .*load-balancing loss.*set tp_sub_microbatches=1"):
        apply_tensor_parallel(build_stage(shard(graph, 1), 0), grid, plan, sub_microbatches=2)


class _BiasedBank(nn.Module):
    """A bank whose down projection has a bias (gpt-oss style): a partial sum would add it twice."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 3
        self.gate_up_proj = nn.Parameter(torch.zeros(3, 16, 8))
        self.down_proj = nn.Parameter(torch.zeros(3, 8, 8))
        self.down_proj_bias = nn.Parameter(torch.zeros(3, 8))


def test_moe_modes_refuse_banks_they_cannot_shard_and_name_the_fix():
    from merak.runtime.tensor_parallel.experts import plan_expert_bank
    from merak.runtime.tensor_parallel.plan import TPError

    with pytest.raises(TPError, match=r"down_proj has a bias.*moe_parallel='expert'.*m\.experts=replicate"):
        plan_expert_bank(_BiasedBank(), "m.experts", 2, "tensor", 2)
    with pytest.raises(TPError, match=r"number of experts of m\.experts \(3\) to be divisible by 2.*moe_parallel='tensor'"):
        plan_expert_bank(_BiasedBank(), "m.experts", 2, "expert", 2)
    assert plan_expert_bank(_BiasedBank(), "m.experts", 3, "expert", 2).specs["down_proj_bias"].dim == 0


class _NormedBank(nn.Module):
    """A bank that runs a per-expert norm with its own weights after the projections (Ergo)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 4
        self.up_proj = nn.Parameter(torch.zeros(4, 8, 16))
        self.down_proj = nn.Parameter(torch.zeros(4, 16, 8))
        self.post_expert_norm = nn.Module()
        self.post_expert_norm.weight = nn.Parameter(torch.ones(4, 8))


@pytest.mark.parametrize("mode", ["tensor", "expert"])
def test_banks_with_weighted_submodules_are_refused_in_both_modes(mode):
    """Sharding a bank's own weights leaves a weighted submodule seeing partial sums (tensor) or
    indexing every expert's rows with local ids (expert): Ergo lost parity at tp=2 in both."""
    from merak.runtime.tensor_parallel.experts import plan_expert_bank
    from merak.runtime.tensor_parallel.plan import TPError

    with pytest.raises(TPError, match=r"\(post_expert_norm\).*tp_mapping 'm\.experts=replicate'"):
        plan_expert_bank(_NormedBank(), "m.experts", 2, mode, 2)


def test_cli_prints_the_tp_plan_of_an_export_traced_model(capsys):
    from merak.partitioner.cli import main

    assert main(["--config", "opt", "hidden_size=32", "ffn_dim=64", "num_hidden_layers=2", "num_attention_heads=4",
                 "word_embed_proj_dim=32", "vocab_size=96", "max_position_embeddings=64", "--stages", "1",
                 "--seq-len", "8", "--flavour", "export", "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "Tensor-parallel plan for OPTForCausalLM, tp=2" in out
    assert "model.decoder.layers.*.fc1 (x2)" in out and "vocab-parallel LM head" in out


# ---- every decoder family ---------------------------------------------------------------------------
def _family_job(families: tuple[str, ...]) -> dict:
    """On each rank: per family, ("skipped" | "untraceable" | "refused", why) or ("ran", the parity
    run's results)."""
    import merak
    from merak.partitioner import trace
    from merak.partitioner.tracer import TraceError
    from merak.runtime.tensor_parallel import TPError, plan_tensor_parallel
    from test_tensor_parallel import MICRO, SEQ, _tp_stage_run

    grid = merak.init(tp=2)
    out: dict = {"tp_rank": grid.coord.tp}
    for family in families:
        try:
            model, make_batch = tiny_family(family)
        except FamilyUnavailable as exc:
            out[family] = ("skipped", str(exc))
            continue
        try:
            graph = trace(model, make_batch(batch_size=MICRO, seq_len=SEQ))
        except TraceError as exc:  # the partitioner's limit (pipeline parallelism fails alike), not TP's
            out[family] = ("untraceable", str(exc))
            continue
        try:
            plan_tensor_parallel(graph, 2)
        except TPError as exc:
            out[family] = ("refused", str(exc))
            continue
        try:
            out[family] = ("ran", _tp_stage_run(f"family:{family}", grid, 1))
        except Exception:  # noqa: BLE001 - a failure in a step: recorded, the other families still run
            out[family] = ("crashed", traceback.format_exc())
    return out


def _check_families(per_rank: list[dict], families: tuple[str, ...]) -> dict[str, str]:
    from test_tensor_parallel import _assert_parity

    """Each family's verdict; raises naming every family that crashed, lost parity or was refused
    without naming a fix."""
    verdicts: dict[str, str] = {}
    failures: list[str] = []
    for family in families:
        outcomes = [r[family] for r in per_rank]
        outcome, detail = next((o for o in outcomes if o[0] == "crashed"), outcomes[0])
        try:
            assert all(o[0] == outcome for o in outcomes), f"ranks disagree: {[o[0] for o in outcomes]}"
            assert outcome != "crashed", f"crashed in a step:\n{detail}"
            if outcome == "ran":
                _assert_parity([{"tp_rank": r["tp_rank"], (f"family:{family}", 1): r[family][1]} for r in per_rank],
                               (f"family:{family}",))
            elif outcome == "refused":
                assert any(w in detail for w in FIX_WORDS), f"the refusal names no fix:\n{detail}"
        except AssertionError as exc:
            failures.append(f"{family}: {str(exc)[-1500:]}")
            outcome = "FAILED"
        verdicts[family] = outcome if outcome in ("ran", "FAILED") else f"{outcome}: {detail.splitlines()[0][:200]}"
    print("\n".join(f"{f}: {v}" for f, v in verdicts.items()))
    assert not failures, "\n\n".join(failures)
    return verdicts


def test_fast_families_train_with_parity_or_are_refused_up_front(dist_run):
    per_rank = dist_run(_family_job, 2, FAST_FAMILIES, timeout=900)
    verdicts = _check_families(per_rank, FAST_FAMILIES)
    assert verdicts["qwen2"] == "ran" and verdicts["qwen2_moe"] == "ran", verdicts


FAMILIES_PER_JOB = 12  # fresh ranks per batch: ~150 tiny models in one process grew until the OOM killer stopped it


@pytest.mark.slow
@pytest.mark.timeout(0)  # ~150 families: the harness bounds each batch instead (60 s per family + 300 s)
def test_every_decoder_family_trains_with_parity_or_is_refused_up_front(dist_run):
    chosen = os.environ.get("MERAK_FAMILIES")
    families = tuple(chosen.split(",")) if chosen else tuple(decoder_families())
    per_rank: list[dict] = [{}, {}]
    for start in range(0, len(families), FAMILIES_PER_JOB):
        batch = families[start:start + FAMILIES_PER_JOB]
        for merged, result in zip(per_rank, dist_run(_family_job, 2, batch, timeout=60 * len(batch) + 300)):
            merged.update(result)
    _check_families(per_rank, families)


# ---- pricing: the memory estimator and the cluster simulator know both MoE modes -----------------------
def test_memory_and_simulator_price_both_moe_modes():
    from merak.planner.cluster import Cluster, Device, Link
    from merak.planner.cost import RankCostModel, tp_layer_factors
    from merak.planner.search import SearchSpace, search
    from merak.planner.simulator import Strategy, TracedModel, predict
    from merak.runtime.memory.estimator import static_bytes

    model = TracedModel.from_config("mixtral num_hidden_layers=2 hidden_size=64 intermediate_size=256 "
                                    "num_attention_heads=4 num_key_value_heads=2 num_local_experts=4 "
                                    "num_experts_per_tok=2 vocab_size=128", seq_len=32)
    flat = Device("flat", peak_flops=1e12, hbm_bytes=64 * 2**30, hbm_bytes_per_s=1e11, matmul_efficiency=1.0,
                  half_efficiency_dim=0.0, memory_efficiency=1.0, kernel_floor_s=0.0, reserved_bytes=0.0)
    cluster = Cluster(flat, 1, 2, Link(1e9, 1e-6), Link(1e9, 1e-6))
    bank_params = sum(p.numel() for n, p in model.graph.model.named_parameters() if ".experts." in n)
    one = predict(model, Strategy(tp=1, dp=2, micro_batch=2), 8, cluster)
    for moe in ("tensor", "expert"):
        plan = model.tp_plan(2, moe)
        assert plan.style("model.layers.0.mlp.experts") == "experts"
        two = predict(model, Strategy(tp=2, micro_batch=2, moe=moe), 8, cluster)
        # every bank parameter (most of the model) is halved on a rank, in either mode
        assert one.memory[0].params_bytes - two.memory[0].params_bytes >= bank_params * 4 / 2
        base = RankCostModel(flat, batch_scale=2, tp=2, tp_plan=plan)
        assert tp_layer_factors(model.graph, base, 1, cluster.intra)[0] > 1.0  # the bank's collectives cost time
    # expert mode moves top_k/tp x 2 + 1 = 3 token sets per bank where tensor mode all-reduces one (2x)
    f_tensor = tp_layer_factors(model.graph, RankCostModel(flat, batch_scale=2, tp=2, tp_plan=model.tp_plan(2)), 1,
                                cluster.intra)[0]
    f_expert = tp_layer_factors(model.graph, RankCostModel(flat, batch_scale=2, tp=2,
                                                           tp_plan=model.tp_plan(2, "expert")), 1, cluster.intra)[0]
    assert f_expert > f_tensor
    space = SearchSpace(schedules=("1f1b",), recomputes=("none",), micro_batches=(2,), tp_sub_microbatches=(1,),
                        tp_degrees=(2,))
    assert {s.strategy.moe for s in search(model, cluster, 8, space, keep=4).best} == {"tensor", "expert"}


# ---- the trainer ----------------------------------------------------------------------------------------
TRAIN_STEPS, TRAIN_MICRO, TRAIN_M = 3, 2, 2


def _moe_trainer_job(root: str, moe: str) -> list[float]:
    import merak
    from test_trainer import dataset

    merak.init(tp=2, pp=1)
    model, make_batch = tiny_model("mixtral")
    args = merak.MerakArguments(
        output_dir=root, per_device_train_batch_size=TRAIN_MICRO, gradient_accumulation_steps=TRAIN_M,
        max_steps=TRAIN_STEPS, logging_steps=1, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
        seed=7, report_to="none", save_strategy="no", disable_tqdm=True, moe_parallel=moe, max_grad_norm=0.0)
    trainer = merak.MerakTrainer(model, args, train_dataset=dataset(make_batch))
    assert all(e.mode == moe for e in trainer.tp_plan.experts.values()) and trainer.tp_plan.experts
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_moe_parallel_is_a_checked_argument():
    import merak

    with pytest.raises(ValueError, match="moe_parallel='experts' is not one of tensor, expert"):
        merak.MerakArguments(output_dir="/tmp/merak-moe-arg", moe_parallel="experts", report_to="none")


@pytest.mark.slow
@pytest.mark.parametrize("moe", ["tensor", "expert"])
def test_trainer_trains_mixtral_at_tp2_like_one_process(dist_run, tmp_path, moe):
    from merak.data import StepBatches
    from reference import single_process_run
    from test_trainer import dataset
    from transformers import default_data_collator

    per_rank = dist_run(_moe_trainer_job, 2, str(tmp_path), moe, timeout=600)
    model, make_batch = tiny_model("mixtral")
    batches = StepBatches(dataset(make_batch), default_data_collator, TRAIN_MICRO, TRAIN_M, 1, 0, seed=7)
    curve, _ = single_process_run(model, [batches.microbatches(s) for s in range(TRAIN_STEPS)],
                                  torch.optim.SGD(model.parameters(), lr=0.1))
    for losses in per_rank:
        torch.testing.assert_close(losses, curve, rtol=2e-5, atol=2e-6)
