"""Automatic restart (issue 18): under torchrun with --max-restarts and
``resume_from_checkpoint=True``, a dp=2 x pp=2 job whose rank is SIGKILLed at step 3 restarts from
its last complete checkpoint (step 2) and finishes; its loss history equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_harness import free_port

JOB = Path(__file__).resolve().parent / "restart_job.py"


def _torchrun(out: Path, *job_args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MERAK_TIMEOUT_S="30")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--max-restarts", "1",
           "--master-port", str(free_port()), str(JOB), str(out), *job_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return json.loads((out / "losses.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_rank_restarts_and_matches_the_uninterrupted_run(tmp_path):
    uninterrupted = _torchrun(tmp_path / "full")
    restarted = _torchrun(tmp_path / "killed", "3", "1")  # rank 1 (stage 0, dp 1) dies after step 3
    assert restarted["restarts"] == "1", "the job was not restarted"
    assert [s for s, _ in uninterrupted["losses"]] == [1, 2, 3, 4, 5, 6]
    assert restarted["losses"] == uninterrupted["losses"]
