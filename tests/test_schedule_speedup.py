"""benchmarks/schedule_speedup.py: paired ratios, the every-round verdict and the loss check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_model import BenchConfig  # noqa: E402
from benchmarks.schedule_speedup import Round, report  # noqa: E402


def _round(base: list[float], other: list[float], drift: float = 0.0) -> Round:
    losses = [7.0, 6.9]
    return Round({"1f1b": base, "zb_v": other},
                 {"1f1b": losses, "zb_v": [x + drift for x in losses]})


def test_paired_ratio_is_the_median_of_per_step_ratios_not_of_medians() -> None:
    # a slow second for both schedules (the machine's drift) cancels in each step's ratio
    r = _round([1.0, 2.0, 1.0], [0.9, 1.8, 1.0])
    assert r.ratios("zb_v") == pytest.approx([1 / 0.9, 2 / 1.8, 1.0])
    assert r.paired("zb_v") == pytest.approx(1 / 0.9)
    assert r.of_medians("zb_v") == pytest.approx(1.0 / 1.0)
    assert r.samples_per_s("zb_v", 32) == pytest.approx(32.0)


def test_report_says_no_unless_every_round_clears_the_target(tmp_path: Path) -> None:
    cfg = BenchConfig(steps=2, warmup_steps=0)
    good, bad = _round([1.1, 1.1], [1.0, 1.0]), _round([1.0, 1.0], [1.0, 1.0])
    body, agree = report([good, good], ["1f1b", "zb_v"], cfg, tmp_path / "x.png")
    assert agree and "| `zb_v` | 1.100 | 1.100 | yes |" in body
    body, _ = report([good, bad], ["1f1b", "zb_v"], cfg, tmp_path / "x.png")
    assert "| `zb_v` | 1.100 | 1.000 | **no** |" in body
    _, agree = report([_round([1.0, 1.0], [1.0, 1.0], drift=1e-3)], ["1f1b", "zb_v"], cfg, tmp_path / "x.png")
    assert not agree  # schedules that do not train the same model are not compared
