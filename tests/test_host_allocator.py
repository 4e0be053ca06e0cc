"""Host allocator policy: freed CPU memory is kept for reuse instead of being page-faulted back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from merak.runtime.memory import host_allocator

#: Allocate 160 MiB in 4 MiB tensors, free them all, again and again: glibc's defaults trim the
#: freed heap top each time, so every round faults the pages back in; kept memory is reused.
_CHURN = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from merak.runtime.memory.host_allocator import keep_freed_host_memory
    assert keep_freed_host_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def churn():
    tensors = [torch.ones(2**20) for _ in range(40)]  # 40 x 4 MiB, every page touched
    del tensors
churn()
before = faults()
for _ in range(5):
    churn()
print((faults() - before) // 5)
"""


def _faults_per_round(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True,
                         env={"MERAK_HOST_ALLOCATOR": "", "OMP_NUM_THREADS": "1", "PATH": ""})
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(host_allocator._glibc() is None, reason="needs glibc (mallopt)")
def test_kept_memory_is_reused_without_page_faults() -> None:
    default, kept = _faults_per_round("default"), _faults_per_round("keep")
    pages = 160 * 2**20 // 4096
    # glibc's defaults hand part of it back every round (how much depends on its dynamic
    # thresholds: 20-40 % of the pages here) and fault it in again; kept memory is reused.
    assert default > pages // 10, (default, kept)
    assert kept * 3 < default, (default, kept)


def test_opting_out_leaves_the_allocator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_allocator, "_applied", False)
    monkeypatch.setenv(host_allocator.OPT_OUT_ENV, "system")
    assert host_allocator.keep_freed_host_memory() is False
