"""Layer-granular activation actions (keep / recompute / selective / offload).

* single process: a stage under each action computes exactly the loss and gradients of the
  plain stage (dropout on, so recomputation must replay the RNG); ``RECOMPUTE`` really re-runs
  the layers at the instruction and backward then does not run them again; the activation
  memory held after a forward drops keep > selective > recompute;
* modes -> plans: layer counts per stage and the fractions the schedules read;
* multi-process: every mode (and an all-offload plan) under 1F1B, shifted critical path and
  zero bubble reproduces the single-process loss and gradients, with the counted layer forwards
  equal to forwards + RECOMPUTE instructions.

How memory is measured: ``torch.utils.checkpoint`` and our own checkpoint both install
``saved_tensors_hooks``, which hide the region's saved tensors from any outer hook, so counting
through an outer hook would see nothing. Instead a dispatch mode records every storage the
forward creates, and the bytes of those still alive after the forward (held by autograd's saved
tensors, by a checkpoint's inputs, or by the outputs) are what the forward costs in memory.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from reference import single_process_run
from tiny_models import tiny_model

DROPOUT = {"gpt2": dict(attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1), "llama": dict(attention_dropout=0.1)}


class LiveStorages(TorchDispatchMode):
    """Records the storages created inside the block; :meth:`alive_bytes` sums those still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                known = self.refs.get(storage.data_ptr())
                # an address freed inside the block and reused by a new storage: count the new one
                if known is None or known[0]() is None:
                    self.refs[storage.data_ptr()] = (weakref.ref(storage), storage.nbytes())
        return out

    def alive_bytes(self) -> int:
        gc.collect()
        return sum(n for ref, n in self.refs.values() if ref() is not None)


class CountOps(TorchDispatchMode):
    def __init__(self, op) -> None:
        super().__init__()
        self.op, self.count = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is self.op
        return func(*args, **(kwargs or {}))


def _one_stage(kind: str, seq: int = 8, **overrides):
    from merak.partitioner import build_stage, shard, trace

    model, make_batch = tiny_model(kind, **{**DROPOUT[kind], **overrides})
    batch = make_batch(batch_size=2, seq_len=seq)
    plan = shard(trace(model, batch), 1)
    return build_stage(plan, 0), plan, batch


def _run(stage, actions, batch, eager: bool, seed: int = 3):
    """Forward with ``actions`` applied, optional RECOMPUTE, backward: (loss, grads, runner)."""
    from merak.runtime.memory.stage_activations import StageActivations

    runner = StageActivations(stage, actions)
    stage.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = runner.forward(0, True, batch, {})
    if eager:
        runner.recompute(0)
    out["loss"].backward()
    runner.release(0)
    return out["loss"].detach(), {n: p.grad.clone() for n, p in stage.named_parameters()}, runner


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_every_action_reproduces_the_plain_stage(kind):
    from merak.runtime.memory.policy import ActivationPlan

    stage, plan, batch = _one_stage(kind)
    ref_loss, ref_grads, _ = _run(stage, {}, batch, eager=False)
    layers = ActivationPlan.from_mode("none", plan).layers
    plans = {mode: ActivationPlan.from_mode(mode, plan) for mode in ("full", "selective")}
    plans["offload"] = ActivationPlan.uniform(layers, "offload")
    plans["mixed"] = ActivationPlan(({layers[0][0]: "recompute", layers[0][1]: "selective",
                                      layers[0][2]: "offload"},), layers)
    _, other_seed, _ = _run(stage, {}, batch, eager=False, seed=4)
    assert not torch.equal(other_seed["lm_head.weight"], ref_grads["lm_head.weight"]), "dropout must be active"
    for name, activation_plan in plans.items():
        for eager in (True, False):
            loss, grads, runner = _run(stage, activation_plan.actions(0), batch, eager)
            assert runner.active, name
            torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7, msg=f"{name} eager={eager}")
            assert grads.keys() == ref_grads.keys()
            for param, g in grads.items():
                torch.testing.assert_close(g, ref_grads[param], rtol=1e-6, atol=1e-7,
                                           msg=f"{name} eager={eager}: gradient of {param}")


def test_recompute_happens_at_the_instruction_and_backward_does_not_repeat_it():
    from merak.runtime.memory.policy import ActivationPlan
    from merak.runtime.memory.stage_activations import StageActivations

    stage, plan, batch = _one_stage("gpt2")
    calls = []
    for i in range(4):  # one Conv1D per layer
        stage.get_submodule(f"transformer.h.{i}.mlp.c_fc").register_forward_hook(lambda *_: calls.append(1))
    runner = StageActivations(stage, ActivationPlan.from_mode("full", plan).actions(0))
    out = runner.forward(7, True, batch, {})
    assert len(calls) == 4
    runner.recompute(7)
    assert len(calls) == 8
    runner.recompute(7)  # a second RECOMPUTE of the same micro-batch is a no-op
    out["loss"].backward()
    assert len(calls) == 8, "backward recomputed layers a second time"
    runner.release(7)
    out = runner.forward(8, True, batch, {})
    out["loss"].backward()  # no RECOMPUTE: backward recomputes each layer once, lazily
    assert len(calls) == 16
    runner.forward(9, False, batch, {})["loss"].backward()  # not a recomputed micro-batch: plain
    assert len(calls) == 20

    selective = StageActivations(stage, ActivationPlan.from_mode("selective", plan).actions(0))
    with CountOps(torch.ops.aten._softmax.default) as softmax:
        out = selective.forward(0, True, batch, {})
        assert softmax.count == 4
        selective.recompute(0)
        assert softmax.count == 8
        out["loss"].backward()
    assert softmax.count == 8


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_activation_memory_drops_keep_selective_recompute(kind):
    from merak.runtime.memory.policy import ActivationPlan
    from merak.runtime.memory.stage_activations import StageActivations

    stage, plan, batch = _one_stage(kind, seq=64)
    layers = ActivationPlan.from_mode("none", plan).layers
    held = {}
    for action in ("keep", "selective", "recompute"):
        runner = StageActivations(stage, ActivationPlan.uniform(layers, action).actions(0))
        with LiveStorages() as live:
            out = runner.forward(0, True, batch, {})
        held[action] = live.alive_bytes()
        out["loss"].backward()
        runner.release(0)
        del out
    # seq 64 > hidden 32: the sequence² attention tensors dominate what selective drops
    assert held["recompute"] < 0.2 * held["keep"], held
    assert held["recompute"] < held["selective"] < 0.7 * held["keep"], held


def test_modes_become_layer_counts_and_schedule_fractions():
    from merak.partitioner import shard, trace
    from merak.runtime.memory.policy import WHOLE_STAGE, ActivationPlan, LayerAction, stage_layers
    from merak.runtime.memory.recompute_plan import RecomputePlan

    model, make_batch = tiny_model("gpt2", n_layer=8)
    plan = shard(trace(model, make_batch()), 4, method="uniform")
    layers = stage_layers(plan)
    assert [len(n) for n in layers] == [2, 2, 2, 2]
    assert ActivationPlan.from_mode("none", plan).recompute_plan().fractions == (0, 0, 0, 0)
    full = ActivationPlan.from_mode("full", plan)
    assert full.recompute_plan().fractions == (1, 1, 1, 1)
    assert set(full.actions(2).values()) == {LayerAction.RECOMPUTE}
    selective = ActivationPlan.from_mode("selective", plan)
    assert set(selective.actions(0).values()) == {LayerAction.SELECTIVE}
    aware = ActivationPlan.from_mode("stage_aware", plan)
    rule = RecomputePlan.stage_aware(4).fractions  # 0.5, 0.25, 0, 0
    counts = [len(aware.actions(s)) for s in range(4)]
    assert counts == [int(f * 2 + 0.5) for f in rule] == [1, 1, 0, 0]
    assert list(aware.actions(0)) == [layers[0][0]], "the earliest layer of a stage is recomputed first"
    assert aware.recompute_plan().fractions == (0.5, 0.5, 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown recompute mode"):
        ActivationPlan.from_mode("most", plan)
    with pytest.raises(ValueError, match="not among its layers"):
        ActivationPlan(({"transformer.h.7": "recompute"},), (("transformer.h.0",),))
    with pytest.raises(ValueError, match="actions are"):
        ActivationPlan(({"transformer.h.0": "drop"},))

    flat = shard(trace(Flat(), {"x": torch.randn(2, 8), "labels": torch.randint(0, 3, (2,))}), 1)
    assert stage_layers(flat) == ((WHOLE_STAGE,),)
    assert ActivationPlan.from_mode("full", flat).actions(0) == {WHOLE_STAGE: LayerAction.RECOMPUTE}


class Flat(nn.Module):
    """No repeated layers: the whole stage is one unit."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x, labels):
        return {"loss": nn.functional.cross_entropy(self.b(torch.tanh(self.a(x))), labels)}


def test_whole_stage_unit_and_refused_combinations():
    from merak.partitioner import build_stage, shard, trace
    from merak.runtime.memory.policy import ActivationPlan
    from merak.runtime.memory.layer_checkpoint import RecomputeFrame
    from merak.runtime.memory.stage_activations import StageActivations

    batch = {"x": torch.randn(2, 8), "labels": torch.randint(0, 3, (2,))}
    plan = shard(trace(Flat(), batch), 1)
    stage = build_stage(plan, 0)
    ref_loss, ref_grads, _ = _run(stage, {}, batch, eager=False)
    loss, grads, runner = _run(stage, ActivationPlan.from_mode("full", plan).actions(0), batch, eager=True)
    assert runner.describe() == "whole stage: recompute"
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0)

    gpt2, gpt2_plan, _ = _one_stage("gpt2")
    with pytest.raises(ValueError, match="does not run"):
        StageActivations(gpt2, {"transformer.h.9": "recompute"})
    gpt2.forward = lambda data, received: type(gpt2).forward(gpt2, data, received)  # as tp sub-micro-batching does
    with pytest.raises(ValueError, match="tp_sub_microbatches=1"):
        StageActivations(gpt2, ActivationPlan.from_mode("selective", gpt2_plan).actions(0))
    assert StageActivations(gpt2, ActivationPlan.from_mode("full", gpt2_plan).actions(0)).describe() == \
        "whole stage: recompute"

    flips = iter([False, True])

    def moody(x):  # data-dependent control flow: the recomputation differs from the forward
        return (x.exp() * x).sum() if next(flips) else x.sin().sum()

    x = torch.randn(3, requires_grad=True)
    frame = RecomputeFrame(moody, (x,), "layer moody", torch.device("cpu"))
    frame.forward()
    with pytest.raises(RuntimeError, match="did not reproduce its forward.*keep this layer"):
        frame.recompute()


# ---- multi-process parity ------------------------------------------------------------------------
MICRO, SEQ, STEPS, LR = 2, 8, 2, 0.05
CONFIGS = [("1f1b", "full"), ("1f1b", "selective"), ("1f1b", "offload"),
           ("shifted_critical_path", "full"), ("shifted_critical_path", "stage_aware"),
           ("shifted_critical_path", "selective"), ("zero_bubble", "full"), ("zero_bubble", "stage_aware")]
#: The default suite's share: one of each mode and each schedule (process start-up and tracing dominate).
QUICK = [("1f1b", "full"), ("1f1b", "offload"), ("shifted_critical_path", "stage_aware"),
         ("shifted_critical_path", "selective"), ("zero_bubble", "full")]


def _batches(make_batch, num: int, step: int) -> list[dict[str, torch.Tensor]]:
    return [make_batch(batch_size=MICRO, seq_len=SEQ, seed=1000 * step + i) for i in range(num)]


def _activation_plan(mode: str, sharding_plan):
    from merak.runtime.memory.policy import ActivationPlan, stage_layers

    if mode == "offload":
        return ActivationPlan.uniform(stage_layers(sharding_plan), "offload")
    return ActivationPlan.from_mode(mode, sharding_plan)


def _first_linear(stage: nn.Module, layer: str) -> nn.Module:
    return next(mod for name, mod in stage.named_modules() if name.startswith(layer + ".")
                and (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"))


def _pipeline(kind: str, dp: int, pp: int, m: int, configs) -> dict:
    import merak
    from merak.partitioner import build_stage, shard, trace
    from merak.runtime.memory.policy import stage_layers
    from merak.runtime.pipeline.executor import PipelineExecutor, all_reduce_mean_loss
    from merak.runtime.pipeline.instructions import Op
    from merak.runtime.pipeline.schedule import build

    grid = merak.init(dp=dp, pp=pp)
    out = {}
    for schedule, mode in configs:
        model, make_batch = tiny_model(kind)
        plan = shard(trace(model, make_batch(batch_size=MICRO, seq_len=SEQ)), pp)
        stage = build_stage(plan, grid.stage_id)
        activation_plan = _activation_plan(mode, plan)
        grads: dict[str, torch.Tensor] = {}
        canonical = {local: key for key, local in stage.tied_parameters.items()}

        def keep_first_grads() -> None:
            if not grads:
                grads.update({canonical.get(n, n): p.grad.clone() for n, p in stage.named_parameters()})

        ex = PipelineExecutor(stage, grid, torch.optim.SGD(stage.parameters(), lr=LR),
                              zero_bubble=schedule == "zero_bubble", before_optimizer_step=keep_first_grads,
                              activation_plan=activation_plan)
        instructions = build(schedule, pp, m, grid.stage_id, activation_plan.recompute_plan())
        # Count the forwards of one layer: a recomputed one if the stage has any, else its first.
        recomputed = [name for name, a in activation_plan.actions(grid.stage_id).items() if a.value == "recompute"]
        counted = recomputed[0] if recomputed else stage_layers(plan)[grid.stage_id][0]
        calls = []
        _first_linear(stage, counted).register_forward_hook(lambda *_: calls.append(1))
        losses = []
        for step in range(STEPS):
            mine = _batches(make_batch, dp * m, step)[grid.coord.dp * m:(grid.coord.dp + 1) * m]
            losses.append(all_reduce_mean_loss(ex.run(instructions, mine).loss, grid))
        recomputes = sum(i.op is Op.RECOMPUTE for i in instructions) if recomputed else 0
        out[(schedule, mode)] = (losses, grads, len(calls), STEPS * (m + recomputes), ex.activations.describe())
    return out


def _check(kind: str, dp: int, pp: int, per_rank: list[dict], m: int) -> None:
    model, make_batch = tiny_model(kind)
    steps = [_batches(make_batch, dp * m, step) for step in range(STEPS)]
    ref_losses, ref_grads = single_process_run(model, steps, torch.optim.SGD(model.parameters(), lr=LR))
    for rank, results in enumerate(per_rank):
        for key, (losses, grads, calls, expected_calls, described) in results.items():
            torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, msg=f"{key} rank {rank}")
            assert grads, f"{key} rank {rank} owns no parameters"
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6,
                                           msg=f"{key} rank {rank} grad of {name} ({described})")
            assert calls == expected_calls, f"{key} rank {rank}: {calls} layer forwards, expected {expected_calls}"


LAYOUTS = [
    pytest.param("gpt2", 1, 2, QUICK, id="gpt2-dp1-pp2"),
    pytest.param("gpt2", 1, 2, CONFIGS, id="gpt2-dp1-pp2-all", marks=pytest.mark.slow),
    pytest.param("llama", 1, 4, CONFIGS, id="llama-dp1-pp4", marks=pytest.mark.slow),
    pytest.param("gpt2", 2, 2, CONFIGS, id="gpt2-dp2-pp2", marks=pytest.mark.slow),
    pytest.param("llama", 2, 4, CONFIGS, id="llama-dp2-pp4", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind, dp, pp, configs", LAYOUTS)
def test_every_mode_matches_single_process(dist_run, kind, dp, pp, configs):
    m = max(4, pp)
    per_rank = dist_run(_pipeline, dp * pp, kind, dp, pp, m, configs, timeout=900)
    _check(kind, dp, pp, per_rank, m)


@pytest.mark.slow
@pytest.mark.parametrize("schedule, recompute", [("shifted_critical_path", "selective"), ("1f1b", "stage_aware")])
def test_trainer_recompute_modes_follow_the_single_process_curve(dist_run, schedule, recompute):
    from test_trainer import _train, single_process_curve

    ref = single_process_curve("gpt2")
    for rank, curve in enumerate(dist_run(_train, 2, "gpt2", 1, 2, schedule, recompute=recompute, timeout=600)):
        torch.testing.assert_close(curve, ref, rtol=2e-5, atol=2e-6, msg=f"{schedule}/{recompute} rank {rank}")


TP_CONFIGS = [(1, "1f1b", "full"), (1, "shifted_critical_path", "selective"), (1, "zero_bubble", "offload"),
              (2, "shifted_critical_path", "stage_aware")]  # k=2: the stage forward is the TP runner


def _tp_pipeline(kind: str, tp: int, pp: int) -> dict:
    import merak
    from merak.partitioner import build_stage, shard, trace
    from merak.runtime.pipeline.executor import PipelineExecutor, all_reduce_mean_loss
    from merak.runtime.pipeline.schedule import build
    from merak.runtime.tensor_parallel import apply_tensor_parallel, plan_tensor_parallel
    from test_tensor_parallel import LR, M, MICRO, SEQ, _steps

    grid = merak.init(tp=tp, pp=pp)
    out: dict = {"tp_rank": grid.coord.tp}
    for k, schedule, mode in TP_CONFIGS:
        model, make_batch = tiny_model(kind)
        graph = trace(model, make_batch(batch_size=MICRO, seq_len=SEQ))
        plan = shard(graph, pp)
        stage = build_stage(plan, grid.stage_id)
        apply_tensor_parallel(stage, grid, plan_tensor_parallel(graph, tp), sub_microbatches=k)
        activation_plan = _activation_plan(mode, plan)
        canonical = {local: key for key, local in stage.tied_parameters.items()}
        grads: dict = {}

        def keep_first() -> None:
            if not grads:
                grads.update({canonical.get(n, n): (p.grad.clone(), stage.tp_param_specs.get(n))
                              for n, p in stage.named_parameters()})

        ex = PipelineExecutor(stage, grid, torch.optim.SGD(stage.parameters(), lr=LR), before_optimizer_step=keep_first,
                              zero_bubble=schedule == "zero_bubble", activation_plan=activation_plan)
        instructions = build(schedule, pp, M, grid.stage_id, activation_plan.recompute_plan())
        losses = [all_reduce_mean_loss(ex.run(instructions, mbs).loss, grid) for mbs in _steps(make_batch)]
        out[(k, schedule, mode)] = (losses, grads, ex.activations.describe())
    return out


@pytest.mark.slow
def test_layer_actions_under_tensor_parallelism(dist_run):
    from test_tensor_parallel import _reference

    ref_losses, ref_grads = _reference("gpt2")
    for rank, results in enumerate(dist_run(_tp_pipeline, 4, "gpt2", 2, 2, timeout=900)):
        for key in TP_CONFIGS:
            losses, grads, described = results[key]
            if key[0] > 1:  # stage 0 (ranks 0, 1) recomputes one layer: the whole stage instead
                assert described == ("whole stage: recompute" if rank < 2 else "keep all"), (key, rank, described)
            torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, msg=f"{key} rank {rank}")
            for name, (grad, spec) in grads.items():
                want = ref_grads[name] if spec is None else spec.local(ref_grads[name], results["tp_rank"])
                torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6, msg=f"{key} rank {rank} grad {name}")
