"""Launch integration: merak-run's command line, and real deepspeed / torchrun jobs on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from dist_harness import free_port
from merak.launch.cli import build_command


def test_nproc_alias_and_passthrough():
    cmd = build_command(["--nproc", "4", "--hostfile", "h", "train.py", "--lr", "1"], gpus=0)
    assert cmd[1:] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "4", "--hostfile", "h",
                       "train.py", "--lr", "1"]
    assert build_command(["--nproc=2", "x.py"], gpus=0)[-3:] == ["--num_gpus", "2", "x.py"]


def test_cpu_without_process_count_explains_fix():
    with pytest.raises(SystemExit, match=r"merak-run --nproc 8 train.py"):
        build_command(["train.py"], gpus=0)
    assert build_command(["train.py"], gpus=8)[-1] == "train.py"  # GPUs: deepspeed counts them


def _run(cmd: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


SMOKE = ["merak.launch.smoke", "--dp", "2", "--tp", "1", "--pp", "2"]


def _coords(out: str) -> set[str]:
    # Ranks share the launcher's pipe, so their lines may interleave: search, don't split.
    return set(re.findall(r"rank \d+/\d+(?=: pp=)", out))


@pytest.mark.slow  # the default run covers the deepspeed launcher with test_demo's end-to-end job
def test_deepspeed_launcher_four_cpu_ranks():
    out = _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "4",
                "--master_port", str(free_port()), "--module", *SMOKE])
    assert _coords(out) == {f"rank {r}/4" for r in range(4)}
    assert "OK: dp=2 tp=1 pp=2 grid on 4 ranks" in out


def test_torchrun_four_cpu_ranks():
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                "--master-port", str(free_port()), "-m", *SMOKE])
    assert _coords(out) == {f"rank {r}/4" for r in range(4)}
    assert "OK: dp=2 tp=1 pp=2 grid on 4 ranks" in out


def test_merak_run_console_script():
    out = _run([sys.executable, "-m", "merak.launch.cli", "--nproc", "2", "--master_port", str(free_port()), "--module",
                "merak.launch.smoke", "--pp", "2"])
    assert "OK: dp=1 tp=1 pp=2 grid on 2 ranks" in out
