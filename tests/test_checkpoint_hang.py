"""A peer stopped (SIGSTOP) inside a checkpoint save or load: every other rank ends within
``MERAK_TIMEOUT_S`` with an error naming itself, the step and what it waited for (issue 18).

A stopped process keeps its sockets open, so only timeouts can end its peers. Here rank 1 stops
itself inside ``torch.distributed.checkpoint``'s save (after its part is written, while rank 0
waits in DCP's final gather; in the background thread for ``async_save``) or load (after its reads, while rank 0 waits in DCP's closing
all-gather), through the fault hook ``MERAK_CHECKPOINT_FAULT=1:<point>:<n>:stop``. The job is a
plain ``nn.Linear`` on a dp=2 grid: no model tracing, a few seconds per case (the
``async_save`` case runs with ``-m slow``).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_harness import RankFailed

LIMIT_S = 3
#: The error's way out and a loaded 2-core machine.
MARGIN_S = 7


def _hang_in_checkpoint(root: str, report: str, case: str) -> None:
    import merak
    from merak.checkpoint import load_checkpoint, save_checkpoint

    grid = merak.init(dp=2)
    pids: list[int | None] = [None, None]
    dist.all_gather_object(pids, os.getpid())
    torch.manual_seed(0)
    stage = nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(stage.parameters())
    state = {"stage": stage, "grid": grid, "optimizer": optimizer}
    save_checkpoint(f"{root}/checkpoint-1", **state, extra={"global_step": 1})
    start = time.monotonic()
    try:
        if case == "load":  # the limit as an argument (the environment says 60 s here)
            load_checkpoint(f"{root}/checkpoint-1", **state, timeout_s=LIMIT_S)
        else:
            pending = save_checkpoint(f"{root}/checkpoint-2", **state, extra={"global_step": 2},
                                      async_save=case == "async_save")
            if pending is not None:
                pending.wait()
        outcome = "finished although rank 1 was stopped"
    except Exception as exc:  # noqa: BLE001 - the error is what the test checks
        outcome = f"{type(exc).__name__}: {exc}"
    with open(report, "w") as f:
        json.dump({"waited": time.monotonic() - start, "error": outcome}, f)
    os.kill(pids[1], signal.SIGKILL)  # the stopped rank never resumes


@pytest.mark.parametrize("case", ["save", pytest.param("async_save", marks=pytest.mark.slow), "load"])
def test_stopped_peer_ends_a_checkpoint_within_the_limit(dist_run, tmp_path, case):
    report = tmp_path / "rank0.json"
    load = case == "load"
    fault = "1:read:1:stop" if load else "1:written:2:stop"
    with pytest.raises(RankFailed, match="rank 1"):  # killed: it reports nothing
        dist_run(_hang_in_checkpoint, 2, str(tmp_path), str(report), case, timeout=120, grace=5,
                 env={"MERAK_TIMEOUT_S": str(60 if load else LIMIT_S), "MERAK_CHECKPOINT_FAULT": fault})
    got = json.loads(report.read_text())
    assert got["waited"] <= LIMIT_S + MARGIN_S, got
    error = got["error"]
    assert "rank 0" in error and f"{LIMIT_S}s" in error, got
    if load:
        assert "loading checkpoint" in error and "checkpoint-1" in error and "step 1" in error, got
    else:
        assert "saving checkpoint" in error and "checkpoint-2" in error and "step 2" in error, got
    assert "torch.distributed.checkpoint" in error, got  # what it waited for
    assert not (tmp_path / "checkpoint-2").exists(), "a half-written checkpoint was published"
