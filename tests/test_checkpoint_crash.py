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


def _checkpoint_dir(root, step: int, complete: bool, mtime: float) -> str:
    """A checkpoint as the trainer leaves it: HF's ``trainer_state.json`` always, Merak's
    ``layout.json`` only once published (an ``async_save`` still in flight has none)."""
    import os

    from merak.checkpoint import FORMAT, FORMAT_VERSION

    path = root / f"checkpoint-{step}"
    path.mkdir()
    (path / "trainer_state.json").write_text("{}")
    if complete:
        (path / "layout.json").write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION}))
    os.utime(path, (mtime, mtime))
    return str(path)


def test_rotation_keeps_the_save_in_flight_and_the_last_complete_checkpoint(tmp_path):
    from merak.checkpoint import rotate_checkpoints

    two = _checkpoint_dir(tmp_path, 2, True, 1000)
    four = _checkpoint_dir(tmp_path, 4, True, 2000)
    six = _checkpoint_dir(tmp_path, 6, False, 3000)  # being written in the background
    also = ("trainer_state.json",)
    assert rotate_checkpoints(tmp_path, 1, in_flight=[six], also=also) == [two]  # HF would delete 2 and 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    (tmp_path / "checkpoint-6" / "layout.json").write_text((tmp_path / "checkpoint-4" / "layout.json").read_text())
    assert rotate_checkpoints(tmp_path, 1, also=also) == [four]  # published: now the older one goes

    # A misordered modification time must not expose the save in flight either.
    eight = _checkpoint_dir(tmp_path, 8, False, 500)
    assert rotate_checkpoints(tmp_path, 1, in_flight=[eight], also=also) == []
    assert rotate_checkpoints(tmp_path, 2, also=also) == []
    assert rotate_checkpoints(tmp_path, None) == rotate_checkpoints(tmp_path, 0) == []


def _async_saves_with_limit_one(out: str) -> list[tuple[int, str | None, list[str]]]:
    """A MerakTrainer run saving every step in the background with ``save_total_limit=1``;
    returns, at each save, (step, last complete checkpoint, checkpoint directories)."""
    import os

    from transformers import TrainerCallback

    import merak
    from merak.checkpoint import last_complete_checkpoint
    from test_trainer import MICRO, dataset
    from tiny_models import tiny_model

    merak.init()
    seen: list[tuple[int, str | None, list[str]]] = []

    def observe(step: int) -> None:
        last = last_complete_checkpoint(out, also=("trainer_state.json",))
        seen.append((step, last and os.path.basename(last), sorted(p for p in os.listdir(out) if p.startswith("check"))))

    class Observe(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            observe(state.global_step)

    model, make_batch = tiny_model("gpt2")
    args = merak.MerakArguments(
        output_dir=out, per_device_train_batch_size=MICRO, gradient_accumulation_steps=2, max_steps=3,
        save_strategy="steps", save_steps=1, save_total_limit=1, async_save=True, report_to="none",
        disable_tqdm=True, logging_steps=1)
    merak.MerakTrainer(model, args, train_dataset=dataset(make_batch), callbacks=[Observe()]).train()
    observe(-1)  # after train(): the last save is published and rotated
    merak.shutdown()
    return seen


def test_async_save_rotation_never_leaves_no_complete_checkpoint(dist_run, tmp_path):
    seen = dist_run(_async_saves_with_limit_one, 1, str(tmp_path), timeout=300)[0]
    assert seen == [
        (1, None, ["checkpoint-1"]),  # the first save is still being written
        (2, "checkpoint-1", ["checkpoint-1", "checkpoint-2"]),  # HF's rotation would delete checkpoint-1
        (3, "checkpoint-2", ["checkpoint-2", "checkpoint-3"]),
        (-1, "checkpoint-3", ["checkpoint-3"]),
    ], seen
