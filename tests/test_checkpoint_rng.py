"""Random streams in checkpoints (issue 18): bitwise resume with dropout on and tensor
parallelism, and the documented rule for a resume under another layout (``merak.rng_streams``).

The job is :func:`test_checkpoint_reshard.train_job` with every GPT-2 dropout at ``P``: at tp=2
the attention-probability dropout of each rank's heads draws from the TP stream
(``stage.tp_rng``), the others from the default torch stream, so a resume that lost either
stream would draw other masks and other losses.
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_harness import run_distributed
from test_checkpoint_reshard import SAVE_AT, STEPS, train_job

P = 0.1


def test_dropout_resume_is_bitwise_at_tp2_and_follows_the_rng_rule_at_tp1(tmp_path):
    ckpt, probe = str(tmp_path / "ckpt"), str(tmp_path / "rng")
    first = run_distributed(train_job, 2, {"tp": 2}, None, False, {SAVE_AT: ckpt}, dropout=P,
                            rng_probe=f"{probe}-first", timeout=300)[0]
    same = run_distributed(train_job, 2, {"tp": 2}, ckpt, False, {}, dropout=P, rng_probe=f"{probe}-same",
                           timeout=300)[0]
    assert same == first[SAVE_AT:], "same-layout resume with dropout is not bitwise"
    saved = {tp: torch.load(f"{probe}-first.saved.pp00-dp00-tp{tp:02d}.pt", weights_only=False) for tp in (0, 1)}
    assert saved[0]["tp_rng"] and saved[0]["tp_rng"][0]["states"], "the TP stream was not used or not captured"
    for tp in (0, 1):  # every stream of every rank is back
        loaded = torch.load(f"{probe}-same.loaded.pp00-dp00-tp{tp:02d}.pt", weights_only=False)
        assert torch.equal(loaded["torch"], saved[tp]["torch"])
        assert loaded["tp_rng"][0]["seed"] == saved[tp]["tp_rng"][0]["seed"]
        for device, state in saved[tp]["tp_rng"][0]["states"].items():
            assert torch.equal(loaded["tp_rng"][0]["states"][device], state)

    # tp=2 -> tp=1: the default streams of (stage 0, replica 0) continue; the TP streams have
    # no counterpart (the one rank has no sharded region). It trains on without error.
    other = run_distributed(train_job, 1, {"tp": 1}, ckpt, False, {}, dropout=P, rng_probe=f"{probe}-tp1",
                            timeout=300)[0]
    assert len(other) == STEPS - SAVE_AT and all(math.isfinite(loss) for loss in other), other
    loaded = torch.load(f"{probe}-tp1.loaded.pp00-dp00-tp00.pt", weights_only=False)
    assert torch.equal(loaded["torch"], saved[0]["torch"])
    assert loaded["python"] == saved[0]["python"]


def _coords(dims):
    from merak.runtime.distributed.grid import Coord

    return [Coord(pp=p, dp=d, tp=t) for p in range(dims.pp) for d in range(dims.dp) for t in range(dims.tp)]


@pytest.mark.parametrize("saved, now, expected", [
    # same layout: every rank its own streams
    ({"dp": 2, "tp": 2, "pp": 2}, (2, 2, 2), lambda c: ("own", "own")),
    # tp changes: default streams of (pp, dp) from the saved tp 0, the same on every TP rank; no TP stream
    ({"dp": 1, "tp": 2, "pp": 2}, (1, 1, 2), lambda c: (f"pp{c.pp:02d}-dp00-tp00", None)),
    ({"dp": 1, "tp": 1, "pp": 1}, (1, 2, 1), lambda c: ("pp00-dp00-tp00", None)),
    # dp shrinks / grows, tp kept: replicas that existed continue everything, new ones keep their own
    ({"dp": 2, "tp": 2, "pp": 1}, (1, 2, 1), lambda c: (f"pp00-dp00-tp00", f"pp00-dp00-tp{c.tp:02d}")),
    ({"dp": 1, "tp": 2, "pp": 1}, (2, 2, 1),
     lambda c: ("pp00-dp00-tp00", f"pp00-dp00-tp{c.tp:02d}") if c.dp == 0 else (None, None)),
    # another pipeline depth: stage k is another part of the model; nothing is carried
    ({"dp": 1, "tp": 1, "pp": 2}, (1, 1, 4), lambda c: (None, None)),
])
def test_rng_restore_rule(saved, now, expected):
    from merak.rng_streams import coord_name, restore_sources
    from merak.runtime.distributed.grid import ParallelDims

    dims = ParallelDims(dp=now[0], tp=now[1], pp=now[2])
    for coord in _coords(dims):
        want = tuple(coord_name(coord) if w == "own" else w for w in expected(coord))
        assert restore_sources(saved, dims, coord) == want, coord
