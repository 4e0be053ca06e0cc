"""Shared pytest fixtures. Multi-process tests use ``dist_run`` (see dist_harness.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from dist_harness import run_distributed  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture
def dist_run():
    """``dist_run(fn, world_size, *args, timeout=120, **kwargs) -> [result per rank]``."""
    return run_distributed
