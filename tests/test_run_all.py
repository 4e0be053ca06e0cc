"""benchmarks/run_all.py: every benchmark runs (--quick) and lands in one RESULTS.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import run_all  # noqa: E402


def test_reports_are_embedded_with_image_links_relative_to_results(tmp_path: Path) -> None:
    report = tmp_path / "results" / "x.md"
    report.parent.mkdir()
    report.write_text("# Title\n\n## Part\n\n![a](plot.png) ![b](https://e.org/c.png)\n")
    body = run_all._embedded(report, "results/")
    assert body.splitlines()[0] == "## Title"
    assert "### Part" in body
    assert "](results/plot.png)" in body and "](https://e.org/c.png)" in body


def test_unknown_benchmark_names_are_refused() -> None:
    with pytest.raises(SystemExit, match="unknown benchmark"):
        run_all.select("schedule_bubbles,nope", "")
    assert [b.name for b in run_all.select(None, "memory")] == [
        b.name for b in run_all.BENCHMARKS if b.name != "memory"]


@pytest.mark.timeout(1500)  # seven benchmarks, each starting its own (multi-process) jobs
def test_quick_run_of_every_benchmark_writes_results(tmp_path: Path) -> None:
    """The CI run: every benchmark's --quick mode, each report and plot referenced from RESULTS.md."""
    proc = subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick", "--out-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = (tmp_path / "RESULTS.md").read_text()
    for bench in run_all.BENCHMARKS:
        assert f"`{bench.name}` |" in results and (tmp_path / bench.report).exists(), bench.name
    images = re.findall(r"\]\(([^)]+\.png)\)", results)
    assert images, "no plots referenced"
    missing = [i for i in images if not (tmp_path / i).exists()]
    assert not missing, missing
