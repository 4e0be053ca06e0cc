"""The model-parallel RNG stream (``runtime/tensor_parallel/random.py``).

* single process: a fork leaves the default stream untouched, the stream depends on the TP rank
  and replays from its seed, and a recomputation (``RecomputeFrame``) draws the same sharded mask;
* two gloo ranks at tp=2, GPT-2 with every dropout on: the masks of dropouts on sharded
  activations (attention probabilities of each rank's heads) differ across TP ranks, those on
  replicated activations (embedding, residual, MLP output) are equal, and a second run with the
  same seed reproduces every mask. (Parity with dropout off is ``test_tensor_parallel.py``.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merak.runtime.memory.layer_checkpoint import RecomputeFrame
from merak.runtime.tensor_parallel.random import ShardedRandom, TPRNGTracker, is_random_op
from tiny_models import tiny_model

P = 0.5


def _mask(tracker: TPRNGTracker) -> torch.Tensor:
    with tracker.fork(torch.device("cpu")):
        return nn.functional.dropout(torch.ones(256), P) == 0


def test_fork_uses_a_per_rank_stream_and_leaves_the_default_one_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    rank0, rank1, again0 = TPRNGTracker(7, 0), TPRNGTracker(7, 1), TPRNGTracker(7, 0)
    m0, m1, a0 = _mask(rank0), _mask(rank1), _mask(again0)
    assert torch.equal(torch.get_rng_state(), before)  # the replicated stream did not move
    assert not torch.equal(m0, m1) and torch.equal(m0, a0)
    assert not torch.equal(_mask(rank0), m0)  # the stream advances


def test_a_saved_stream_resumes_where_it_stopped():
    tracker = TPRNGTracker(7, 1)
    _mask(tracker)
    saved = tracker.state_dict()
    expected = _mask(tracker)
    resumed = TPRNGTracker(7, 1)
    resumed.load_state_dict(saved)
    assert torch.equal(_mask(resumed), expected)
    with pytest.raises(ValueError, match="same seed"):
        TPRNGTracker(8, 1).load_state_dict(saved)


def test_random_ops_are_recognised():
    assert is_random_op(nn.Dropout(0.1), (), {}) and is_random_op(nn.functional.dropout, (), {"p": 0.1})
    sdpa = nn.functional.scaled_dot_product_attention
    assert is_random_op(sdpa, (), {"dropout_p": 0.1}) and not is_random_op(sdpa, (), {"dropout_p": 0.0})
    assert not is_random_op(nn.Linear(2, 2), (), {}) and not is_random_op(torch.relu, (), {})


def test_recomputation_replays_the_sharded_stream():
    op = ShardedRandom(nn.Dropout(P), TPRNGTracker(3, 1))
    x = torch.ones(64, requires_grad=True)
    frame = RecomputeFrame(lambda t: op(t * 2), [x], "a sharded dropout", torch.device("cpu"))
    out = frame.forward()
    _mask(op.tracker)  # the stream moves on before the recomputation, as in a pipeline
    frame.recompute()  # raises on a mismatch of saved tensors; the gradient shows the mask
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, (out != 0).float() * 2 / (1 - P))


def _dropout_stage_at_tp2(p: float, n_layer: int, batch_size: int, seq_len: int) -> tuple:
    """``(model, batch, stage)``: a tiny GPT-2 with every dropout at ``p`` and this rank's
    tp=2 stage of it (one pipeline stage, TP streams seeded 11)."""
    import merak
    from merak.partitioner import build_stage, shard, trace
    from merak.runtime.tensor_parallel import apply_tensor_parallel, plan_tensor_parallel

    grid = merak.init(tp=2)
    model, make_batch = tiny_model("gpt2", n_layer=n_layer, embd_pdrop=p, resid_pdrop=p, attn_pdrop=p)
    batch = make_batch(batch_size=batch_size, seq_len=seq_len)
    graph = trace(model, batch)
    stage = apply_tensor_parallel(build_stage(shard(graph, 1), 0), grid, plan_tensor_parallel(graph, 2), seed=11)
    return model, batch, stage


def _masks_at_tp2() -> dict:
    _, batch, stage = _dropout_stage_at_tp2(P, n_layer=1, batch_size=2, seq_len=8)
    masks: dict[str, list[torch.Tensor]] = {}
    wrapped = {id(m.op) for m in stage.modules() if isinstance(m, ShardedRandom)}

    def record(name: str):
        return lambda module, args, out: masks.setdefault(name, []).append(out[args[0] != 0] == 0)

    for name, module in stage.named_modules():
        if isinstance(module, ShardedRandom):
            module.register_forward_hook(record("sharded:" + name))
        elif isinstance(module, nn.Dropout) and id(module) not in wrapped:
            module.register_forward_hook(record("replicated:" + name))
    for _ in range(2):  # the same seed twice: every mask again
        torch.manual_seed(5)
        stage.tp_rng.reset()
        stage(batch, {})
    return masks


def test_sharded_dropout_masks_differ_across_tp_ranks_replicated_ones_match(dist_run):
    rank0, rank1 = dist_run(_masks_at_tp2, 2, timeout=120)
    assert rank0.keys() == rank1.keys()
    sharded = [k for k in rank0 if k.startswith("sharded:")]
    replicated = [k for k in rank0 if k.startswith("replicated:")]
    assert sharded and len(replicated) >= 2, sorted(rank0)
    for key in rank0:
        first, second = rank0[key]
        assert torch.equal(first, second), f"{key}: the same seed gave another mask"
        assert 0.3 < first.float().mean() < 0.7, f"{key}: dropped {first.float().mean():.2f}, p={P}"
    for key in sharded:
        assert not torch.equal(rank0[key][0], rank1[key][0]), f"{key}: the TP ranks drew the same mask"
    for key in replicated:
        assert torch.equal(rank0[key][0], rank1[key][0]), f"{key}: replicated copies drew different masks"


DROP, DRAWS = 0.1, 48  # GPT-2's three dropouts at p=0.1; losses of 48 independent draws


def _dropout_losses(model, batch, stage=None) -> list[float]:
    """The loss of ``batch`` under DRAWS dropout draws (the replicated stream seeded per draw,
    the TP streams running on), through ``stage`` or, without one, the unsplit model."""
    losses = []
    for draw in range(DRAWS):
        torch.manual_seed(100 + draw)
        with torch.no_grad():
            loss = model(**batch).loss if stage is None else stage(batch, {})["loss"]
        losses.append(float(loss))
    return losses


def _dropout_losses_at_tp2() -> list[float]:
    model, batch, stage = _dropout_stage_at_tp2(DROP, n_layer=2, batch_size=4, seq_len=16)
    stage.train()
    return _dropout_losses(model, batch, stage)


def test_dropout_at_tp2_matches_one_process_statistically(dist_run):
    """With dropout on, tp=2 draws other masks than one process, so losses differ draw by draw;
    their mean must agree with one process's within four standard errors, and both TP ranks see
    the same (all-reduced) loss. Which masks differ across ranks is the mask test above; this one
    checks that the sharded model's dropout is the same random process as the unsplit model's."""
    model, make_batch = tiny_model("gpt2", n_layer=2, embd_pdrop=DROP, resid_pdrop=DROP, attn_pdrop=DROP)
    model.train()
    reference = torch.tensor(_dropout_losses(model, make_batch(batch_size=4, seq_len=16)))
    rank0, rank1 = dist_run(_dropout_losses_at_tp2, 2, timeout=180)
    assert rank0 == rank1
    sharded = torch.tensor(rank0)
    assert reference.std() > 0 and sharded.std() > 0, "dropout drew no noise"
    assert not torch.equal(sharded, reference)
    error = (reference.var() / DRAWS + sharded.var() / DRAWS).sqrt()
    assert abs(sharded.mean() - reference.mean()) < 4 * error, (sharded.mean(), reference.mean(), error)
