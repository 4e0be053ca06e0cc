"""``benchmarks/gpu_check.py`` on a CPU machine: the dry run lists every check and the report,
and a real run without CUDA refuses (exit 2) instead of writing figures no GPU produced."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import torch
import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_dry_run_lists_every_check_and_the_report(tmp_path):
    out = tmp_path / "gpu_check.md"
    done = _run("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr
    for name in ("trainer", "sdpa", "device-rule", "calibration", "offload", "pipeline-2proc", "memory-estimator"):
        assert f"would run {name}:" in done.stdout
    assert f"would write {out}" in done.stdout and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the real run would measure")
def test_without_cuda_nothing_is_measured(tmp_path):
    out = tmp_path / "gpu_check.md"
    done = _run("--out", str(out))
    assert done.returncode == 2 and "no CUDA device" in done.stderr and not out.exists()
