"""HF Trainer code that calls ``torch.distributed`` itself runs through Merak's distributed layer.

``MerakTrainer.train/evaluate/predict`` route the ``dist`` global of ``transformers.trainer`` and
``transformers.trainer_pt_utils`` through :mod:`merak.runtime.distributed.routed` while HF's code
runs, so e.g. ``store_flos``' all-gather and ``_save_checkpoint``'s barrier are bounded by
``p2p_timeout`` and a stuck peer ends in an error naming the rank, the group and the HF function.
"""

from __future__ import annotations

import time
import types

import pytest
import torch
import torch.distributed as dist

from dist_harness import RankFailed
from merak.runtime.distributed.routed import RoutedDist, routed

#: A stand-in for an HF module: its functions call ``dist.*`` through the module's global.
_FAKE_HF = '''
import torch.distributed as dist

def save(tensor, flag):
    dist.barrier()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, f"rank {dist.get_rank()}")
    return [float(p) for p in parts], float(flag), names
'''


def _fake_hf() -> types.ModuleType:
    module = types.ModuleType("fake_hf")
    module.torch = torch
    exec(_FAKE_HF, module.__dict__)
    return module


def test_routing_is_undone_and_refuses_unbounded_calls():
    module = _fake_hf()
    with routed(module, owner="fake HF") as proxy:
        assert module.dist is proxy and isinstance(proxy, RoutedDist)
        assert proxy.is_initialized is dist.is_initialized  # queries pass through
        with routed(module, owner="inner"):
            assert module.dist is not proxy
        assert module.dist is proxy  # re-entrant
        with pytest.raises(NotImplementedError, match="fake HF called torch.distributed.isend"):
            proxy.isend
    assert module.dist is dist


def _routed_collectives(stuck_rank: int | None) -> object:
    dist.init_process_group("gloo")
    me, module = dist.get_rank(), _fake_hf()
    if me == stuck_rank:
        time.sleep(8)  # alive, but never joins
        return "stuck"
    with routed(module, owner="fake HF", timeout_s=2):
        return module.save(torch.tensor([float(me)]), torch.tensor([float(me == 1)]))


def test_routed_collectives_compute_what_torch_distributed_would(dist_run):
    expected = ([0.0, 1.0], 1.0, ["rank 0", "rank 1"])
    assert dist_run(_routed_collectives, 2, None, timeout=60) == [expected, expected]


def test_a_stuck_peer_ends_the_routed_barrier_with_a_named_error(dist_run):
    with pytest.raises(RankFailed, match=r"rank 0 timed out after waiting up to 2s for torch\.distributed\.barrier "
                                         r"in fake HF \(save\) over the world \(2 ranks\)"):
        dist_run(_routed_collectives, 2, 1, timeout=60)


def _train_with_a_peer_stuck_in_the_save(out: str) -> str:
    """dp=2 GPT-2; rank 1 hangs when HF's Trainer starts a checkpoint; rank 0 must end within
    the limit, in HF's ``store_flos`` (the first collective of ``_save_checkpoint``)."""
    import merak
    from tiny_models import tiny_model
    from test_trainer import dataset

    merak.init(dp=2)
    model, make_batch = tiny_model("gpt2")
    args = merak.MerakArguments(output_dir=out, per_device_train_batch_size=2,
                                gradient_accumulation_steps=1, max_steps=4, save_strategy="steps", save_steps=2,
                                report_to="none", disable_tqdm=True, p2p_timeout=3)
    trainer = merak.MerakTrainer(model, args, train_dataset=dataset(make_batch, 16))
    if dist.get_rank() == 1:
        trainer._save_checkpoint = lambda *a, **k: time.sleep(8)  # a peer frozen at the save
    start = time.monotonic()
    try:
        trainer.train()
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{time.monotonic() - start:.1f}s {exc}"
    return "trained"


@pytest.mark.slow  # ~12 s; the default run bounds the routed barrier (test_a_stuck_peer_...)
def test_hf_store_flos_in_a_save_is_bounded_under_merak_trainer(dist_run, tmp_path):
    reports = dist_run(_train_with_a_peer_stuck_in_the_save, 2, str(tmp_path), timeout=120)
    report = reports[0]
    seconds, message = report.split("s ", 1)
    assert message.startswith("rank 0 timed out after waiting up to 3s for torch.distributed.all_gather in "
                              "transformers' Trainer ("), message
    assert "store_flos > distributed_broadcast_scalars) over the world (2 ranks)" in message, message
    assert float(seconds) < 8  # the limit, not the peer's nap (or HF's 30 minutes)
