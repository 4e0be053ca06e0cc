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


@pytest.mark.slow  # ~26 s; test_quick_run_of_every_benchmark_writes_results (slow) covers it too
def test_one_quick_benchmark_lands_in_results_with_its_commit(tmp_path: Path) -> None:
    """The run/collect path on the cheapest benchmark (pure simulation): report, plots, commit."""
    proc = subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick", "--only", "schedule_bubbles",
                           "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = (tmp_path / "RESULTS.md").read_text()
    assert "`schedule_bubbles` |" in results and "- commit: " in results
    assert run_all.report_commit(tmp_path / "schedule_bubbles.md") == run_all.report_commit(tmp_path / "RESULTS.md")
    images = re.findall(r"\]\(([^)]+\.png)\)", results)
    assert images and all((tmp_path / i).exists() for i in images), images


def test_collect_refuses_reports_of_older_code(tmp_path: Path, capsys, monkeypatch) -> None:
    """RESULTS.md is never assembled from a report whose measured code changed since its commit."""
    (tmp_path / "schedule_bubbles.md").write_text("# Old\n\n- commit: 0123456789ab\n\nnumbers\n")
    (tmp_path / "memory.md").write_text("# Older\n\n- date: 2026-01-01\n\nnumbers\n")
    changed = {"0123456789ab": ["runtime/pipeline/executor.py"]}
    monkeypatch.setattr(run_all, "measured_code_changed_since", lambda c: changed.get(c))
    code = run_all.main(["--collect", "--only", "schedule_bubbles,memory", "--out-dir", str(tmp_path)])
    assert code == 2 and not (tmp_path / "RESULTS.md").exists()
    err = capsys.readouterr()
    assert "schedule_bubbles: made at 0123456789ab; since then changed: runtime/pipeline/executor.py" in err.out
    assert "memory: made at an unnamed commit" in err.out
    assert "--only schedule_bubbles,memory" in err.err
    changed["0123456789ab"] = []  # measured code unchanged since: the report is current
    assert run_all.main(["--check", "--only", "schedule_bubbles", "--out-dir", str(tmp_path)]) == 0


@pytest.mark.slow
@pytest.mark.timeout(3600)  # seven benchmarks, each starting its own (multi-process) jobs; pipeline_throughput alone may take up to its 1800 s quick limit
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
