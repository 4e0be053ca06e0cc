"""``merak-run``: start a Merak job through the deepspeed launcher.

Merak has no launcher of its own: multi-node placement, hostfiles, ``--include``/``--exclude``,
``--master_addr`` and friends are the deepspeed launcher's, passed through untouched. What this
wrapper adds is CPU-friendly defaults, because on a CPU-only box every rank would otherwise
start one OpenMP thread per core and the ranks would fight over the cores:

* ``OMP_NUM_THREADS=1`` for every rank unless already set;
* ``--nproc N`` as a readable alias of ``--num_gpus N`` (the deepspeed launcher counts slots in
  "GPUs" even when the ranks run on CPU);
* a clear error when no GPU is visible and no process count was given.

Examples::

    merak-run --nproc 8 train.py --dp 2 --tp 2 --pp 2           # one node, CPU or GPU
    merak-run --hostfile hosts --num_nodes 2 --num_gpus 8 train.py   # multi-node via deepspeed
    merak-run --nproc 8 --module merak.launch.smoke --dp 2 --tp 2 --pp 2
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

_COUNT_FLAGS = ("--num_gpus", "--include", "--exclude", "--hostfile", "-H", "--num_nodes")


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch or broken CUDA: treat as CPU-only
        return 0


def build_command(argv: Sequence[str], gpus: int) -> list[str]:
    """The deepspeed launcher command for ``merak-run argv`` on a host with ``gpus`` GPUs."""
    args = []
    it = iter(argv)
    for a in it:  # --nproc N / --nproc=N → --num_gpus N
        if a == "--nproc":
            n = next(it, None)
            if n is None:
                raise SystemExit("merak-run: --nproc needs a number of processes, e.g. --nproc 8")
            args += ["--num_gpus", n]
        elif a.startswith("--nproc="):
            args += ["--num_gpus", a.split("=", 1)[1]]
        else:
            args.append(a)
    has_count = any(a.split("=")[0] in _COUNT_FLAGS for a in args)
    if gpus == 0 and not has_count:
        raise SystemExit(
            "merak-run: no GPU is visible, so say how many CPU processes to start, e.g. "
            "`merak-run --nproc 8 train.py` (dp*tp*pp must equal it)."
        )
    return [sys.executable, "-m", "deepspeed.launcher.runner", *args]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd = build_command(argv, _gpu_count())
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
