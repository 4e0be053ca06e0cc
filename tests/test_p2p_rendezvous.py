"""``MERAK_P2P=rendezvous``: gloo sends that complete only once the receiver posted the receive.

Gloo buffers sends, so a schedule that deadlocks under NCCL's rendezvous sends passes every CPU
test. In this mode each message is acknowledged by its receiver when it posts the receive, and
the sending group waits for that acknowledgement; a deadlock ends in the rank-named timeout.

The fast cases run in the default suite: an unpaired facing exchange fails with the named
error, a paired one completes, and one pipeline job covers 1F1B, ZB-V and interleaved 1F1B. The
parity suites - every schedule and layout, TP with sub-micro-batches, ZeRO-1, checkpoint resume,
evaluation - run again under the mode with ``-m slow`` (their own test functions, handed a
``dist_run`` that sets ``MERAK_P2P=rendezvous`` for the ranks it starts).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import test_pipeline_parity as pipeline_parity
import test_tensor_parallel as tensor_parallel
import test_trainer as trainer
import test_virtual_parity as virtual_parity
import test_zero_and_precision as zero
from dist_harness import run_distributed
from merak.runtime.distributed.p2p import P2P, Incoming, Outgoing, P2PTimeoutError, p2p_mode


@pytest.fixture
def rendezvous_run(monkeypatch):
    """``dist_run`` whose ranks run with ``MERAK_P2P=rendezvous`` (they inherit the variable)."""
    monkeypatch.setenv("MERAK_P2P", "rendezvous")
    return run_distributed


def test_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("MERAK_P2P", raising=False)
    assert p2p_mode() == "native"
    monkeypatch.setenv("MERAK_P2P", "rendezvous")
    assert p2p_mode() == "rendezvous" and P2P().mode == "rendezvous"
    monkeypatch.setenv("MERAK_P2P", "eager")
    with pytest.raises(ValueError, match="MERAK_P2P must be one of"):
        p2p_mode()
    with pytest.raises(ValueError, match="emulates NCCL"):
        P2P("cuda", mode="rendezvous")  # no device needed: refused before any allocation


def _facing(paired: bool, mode: str) -> str:
    """Both ranks send to each other, then receive: as two lone groups (unpaired) or one."""
    dist.init_process_group("gloo")
    me, peer = dist.get_rank(), 1 - dist.get_rank()
    p2p = P2P(timeout_s=3, mode=mode)
    what = "activation of micro-batch 1" if me == 0 else "gradient of micro-batch 0"
    out = Outgoing(torch.full((4,), float(me)), peer, what)
    try:
        if paired:
            got = p2p.exchange([out], [Incoming(peer, "the peer's message")])[0]
        else:
            p2p.exchange(sends=[out])
            got = p2p.recv(peer, "the peer's message")
        p2p.wait_sends()
    except P2PTimeoutError as exc:
        return str(exc)
    return f"received {got[0].item():.0f}"


@pytest.mark.parametrize("paired, mode, expected", [
    pytest.param(False, "native", ["received 1", "received 0"], id="unpaired-native"),
    pytest.param(True, "rendezvous", ["received 1", "received 0"], id="paired-rendezvous"),
])
def test_facing_exchange_completes(dist_run, paired, mode, expected):
    assert dist_run(_facing, 2, paired, mode, timeout=60) == expected


def test_unpaired_facing_exchange_ends_in_the_named_timeout(dist_run):
    # gloo alone would buffer both sends (the case above); emulated rendezvous deadlocks as NCCL
    # would, and each rank's error names itself, its peer and the message that was not taken
    # (whichever rank gives up first may leave the other a closed connection instead)
    errors = dist_run(_facing, 2, False, "rendezvous", timeout=60)
    cause = r"(timed out|failed \(peer process probably died\))"
    assert re.search(rf"rank 0 {cause} after waiting up to 3s for rank 1 to post the receive of "
                     rf"activation of micro-batch 1", errors[0]), errors[0]
    assert re.search(rf"rank 1 {cause} after waiting up to 3s for rank 0 to post the receive of "
                     rf"gradient of micro-batch 0", errors[1]), errors[1]
    assert "timed out" in errors[0] + errors[1]  # at least the first to give up saw the timeout


def test_pipeline_schedules_match_single_process_under_rendezvous(rendezvous_run):
    """1F1B, ZB-V (V turn on one rank, dependent exchanges in one group) and interleaved 1F1B
    (a ring over two ranks), GPT-2 over two ranks, against one process."""
    cases = [("1f1b", "none", 1), ("zb_v", "none", 2), ("interleaved_1f1b", "full", 2)]
    virtual_parity.test_virtual_stages_match_single_process(rendezvous_run, "gpt2", 2, cases)


# --- the parity suites again, under -m slow ----------------------------------------------------


def _slow(layouts: list) -> list:
    return [pytest.param(*p.values, id=p.id, marks=pytest.mark.slow) for p in layouts]


@pytest.mark.parametrize("kind, dp, pp", _slow(pipeline_parity.LAYOUTS))
def test_pipeline_parity_under_rendezvous(rendezvous_run, kind, dp, pp):
    pipeline_parity.test_layout_matches_single_process(rendezvous_run, kind, dp, pp)


@pytest.mark.parametrize("kind, pp, cases", _slow(virtual_parity.LAYOUTS))
def test_virtual_parity_under_rendezvous(rendezvous_run, kind, pp, cases):
    virtual_parity.test_virtual_stages_match_single_process(rendezvous_run, kind, pp, cases)


@pytest.mark.parametrize("tp, pp, kinds, ks", _slow(tensor_parallel.LAYOUTS))
def test_tensor_parallel_parity_under_rendezvous(rendezvous_run, tp, pp, kinds, ks):
    tensor_parallel.test_tensor_parallel_matches_single_process(rendezvous_run, tp, pp, kinds, ks)


@pytest.mark.slow
@pytest.mark.parametrize("dp, pp", [(2, 2), (2, 1)])
def test_zero1_under_rendezvous(rendezvous_run, dp, pp):
    zero.test_zero1_matches_single_process_and_shards_states(rendezvous_run, dp, pp)


@pytest.mark.slow
def test_zero1_resume_with_tied_embedding_under_rendezvous(rendezvous_run, tmp_path):
    zero.test_zero1_resume_with_tied_embedding_over_two_stages(rendezvous_run, tmp_path)


@pytest.mark.slow
def test_checkpoint_resume_under_rendezvous(rendezvous_run, tmp_path):
    trainer.test_resume_from_checkpoint_is_bitwise(rendezvous_run, tmp_path)


@pytest.mark.slow
def test_evaluation_resume_and_export_under_rendezvous(rendezvous_run, tmp_path):
    trainer.test_virtual_stages_evaluate_resume_and_export(rendezvous_run, tmp_path)
