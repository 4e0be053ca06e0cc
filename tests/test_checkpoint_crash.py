"""Crash safety of checkpoints (issue 18): a rank SIGKILLed in the middle of a save leaves the
previous checkpoint loadable, and the last *complete* checkpoint is the one a resume picks.

The fault is injected with ``MERAK_CHECKPOINT_FAULT=<rank>:written:<n>``: that rank kills itself
the ``n``-th time its part of a checkpoint is on disk, before the checkpoint is complete.
"""

from __future__ import annotations

import json

import pytest

from dist_harness import RankFailed, run_distributed
from test_checkpoint_reshard import STEPS, train_job


def test_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    from merak.checkpoint import is_complete, last_complete_checkpoint

    uninterrupted = run_distributed(train_job, 2, {"pp": 2}, None, False, {}, timeout=300)[0]
    saves = {step: str(tmp_path / f"checkpoint-{step}") for step in (2, 4)}
    with pytest.raises(RankFailed):
        run_distributed(train_job, 2, {"pp": 2}, None, False, saves, timeout=300, grace=5,
                        env={"MERAK_CHECKPOINT_FAULT": "1:written:2", "MERAK_TIMEOUT_S": "20"})
    assert is_complete(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists(), "a half-written checkpoint was published"
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    # The survivor resumes from it, under another layout, and goes on as the uninterrupted run.
    resumed = run_distributed(train_job, 1, {"pp": 1}, saves[2], False, {}, timeout=300)[0]
    assert resumed == pytest.approx(uninterrupted[2:], rel=1e-5, abs=0)
    assert len(resumed) == STEPS - 2


def test_last_complete_checkpoint_skips_incomplete_ones(tmp_path):
    from merak.checkpoint import FORMAT, FORMAT_VERSION, last_complete_checkpoint

    def checkpoint(step: int, layout: bool, trainer_state: bool) -> None:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if layout:
            (path / "layout.json").write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION}))
        if trainer_state:
            (path / "trainer_state.json").write_text("{}")

    assert last_complete_checkpoint(tmp_path) is None
    checkpoint(2, True, True)
    checkpoint(10, True, True)
    checkpoint(12, False, True)  # Merak's part never published (crash mid-save)
    checkpoint(14, True, False)  # the trainer's files never written
    (tmp_path / ".checkpoint-16.merak-staging").mkdir()
    assert last_complete_checkpoint(tmp_path, also=("trainer_state.json",)) == str(tmp_path / "checkpoint-10")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-14")
