"""Tests of the pipeline-throughput benchmark's harness (benchmarks/pipeline_throughput.py).

The fast tests check the pieces every runner relies on — the stage cut reproduces the HF
model, the registry skips Merak's runners until the executor exists, the report flags runners
that train a different model. The slow test runs the whole benchmark, all launchers, on a tiny
model and checks every available runner trains exactly what the single process trains.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import pipeline_throughput as bench  # noqa: E402
from benchmarks.bench_model import (  # noqa: E402
    BenchConfig,
    build_model,
    lm_loss,
    make_batches,
    microbatches,
    stage_module,
    tied_parameter,
)
from benchmarks.common import Throughput, markdown_table, time_calls  # noqa: E402
from benchmarks.peers import BenchContext, RankResult, merak_runners, runners  # noqa: E402

TINY = BenchConfig(n_layer=2, n_embd=32, n_head=4, seq_len=16, vocab_size=64, micro_batch=2,
                   num_microbatches=4, steps=2, warmup_steps=1)
TINY_OVERRIDES = ["n_layer=2", "n_embd=32", "n_head=4", "seq_len=16", "vocab_size=64", "micro_batch=2",
                  "num_microbatches=4"]


def test_stage_cut_reproduces_hf_model() -> None:
    """Stage 0 then stage 1 gives the HF model's logits and loss, and each owns a tied copy."""
    model = build_model(TINY)
    tokens = make_batches(TINY, 1)[0][: TINY.micro_batch]
    s0, s1 = stage_module(model, TINY, 0), stage_module(model, TINY, 1)
    with torch.no_grad():
        reference = model(input_ids=tokens, labels=tokens)
        logits = s1(s0(tokens))
    torch.testing.assert_close(logits, reference.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(lm_loss(logits, tokens), reference.loss)
    assert tied_parameter(s0) is not tied_parameter(s1)
    torch.testing.assert_close(tied_parameter(s0), tied_parameter(s1))


def test_model_and_data_are_deterministic() -> None:
    for a, b in zip(build_model(TINY).parameters(), build_model(TINY).parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(make_batches(TINY, 2), make_batches(TINY, 2)))
    assert [m.shape[0] for m in microbatches(TINY, make_batches(TINY, 1)[0])] == [TINY.micro_batch] * 4


def test_registry_skips_merak_until_executor_exists() -> None:
    registry = runners()
    assert list(registry)[:3] == ["single-process", "deepspeed-pipe", "torch-pipelining-1f1b"]
    for name in ("merak-1f1b", "merak-shifted_critical_path", "merak-zero_bubble"):
        assert registry[name].group == "merak" and registry[name].nprocs == 2
    if not merak_runners.WIRED:  # skipped with a reason, never run (and never failed)
        assert registry["merak-1f1b"].unavailable().startswith("not available yet")


def test_single_process_runner_in_process() -> None:
    """The baseline runner, called directly: timed steps exclude warm-up; reruns are identical."""
    result = runners()["single-process"].fn(BenchContext(TINY))
    assert len(result.step_times) == TINY.steps == len(result.cpu_times)
    assert len(result.losses) == TINY.steps + TINY.warmup_steps
    assert result.losses == runners()["single-process"].fn(BenchContext(TINY)).losses


def _outcome(name: str, losses: list[float | None]) -> bench.Outcome:
    runner = runners()[name]
    result = bench.JobResult.merge([RankResult([1.0, 2.0, 3.0], losses, [0.9, 1.8, 2.7])])
    return bench.Outcome(runner, rounds=[result], command="cmd")


def test_report_flags_a_runner_that_trains_something_else() -> None:
    single = _outcome("single-process", [5.0, 4.9, 4.8])
    same = _outcome("torch-pipelining-1f1b", [5.0, 4.9, 4.8 + 1e-6])
    drifting = _outcome("deepspeed-pipe", [5.0, 4.9, 4.7])
    skipped = bench.Outcome(runners()["merak-1f1b"], skipped="not available yet: test")
    report = bench.Report(TINY, [single, same, drifting, skipped])
    assert report.status(same) == "ok"
    assert report.status(drifting).startswith("MISMATCH")
    assert report.status(skipped).startswith("skipped")
    assert report.failures() == ["deepspeed-pipe"]
    assert report.physical_limit == pytest.approx(2 * TINY.samples_per_step / 2.0)
    text = report.markdown(quick=True)
    assert "| `merak-1f1b` | merak |" in text and "skipped: not available yet" in text


def test_rounds_pool_steps_and_every_round_must_match() -> None:
    """Rounds pool their timed steps; a round that trains something else fails the row."""
    single = _outcome("single-process", [5.0, 4.9, 4.8])
    runner = runners()["torch-pipelining-1f1b"]
    good = bench.JobResult([1.0, 1.0, 1.0], [5.0, 4.9, 4.8], [0.9])
    pooled = bench.Outcome(runner, rounds=[good, bench.JobResult([2.0, 2.0, 2.0], [5.0, 4.9, 4.8], [0.7])])
    assert pooled.result.step_times == [1.0] * 3 + [2.0] * 3
    assert pooled.result.cpu_per_wall == [pytest.approx(0.8)]
    assert pooled.round_medians(TINY) == [TINY.samples_per_step / 1.0, TINY.samples_per_step / 2.0]
    bad = bench.Outcome(runner, rounds=[good, bench.JobResult([1.0] * 3, [5.0, 4.9, 4.5], [0.9])])
    report = bench.Report(TINY, [single, pooled, bad], rounds=2)
    assert report.status(pooled) == "ok" and report.status(bad).startswith("MISMATCH")
    assert "2 round(s)" in report.markdown(quick=False)


def test_job_result_takes_slowest_rank_and_any_known_loss() -> None:
    merged = bench.JobResult.merge([RankResult([1.0, 3.0], [None, None], [1.0, 1.0]),
                                    RankResult([2.0, 1.0], [7.0, 6.0], [1.0, 1.0])])
    assert merged.step_times == [2.0, 3.0] and merged.losses == [7.0, 6.0]
    assert merged.cpu_per_wall == [pytest.approx(0.5), pytest.approx(2 / 3)]


def test_common_helpers() -> None:
    run = time_calls(lambda x: x * 2, [1, 2, 3], warmup=1)
    assert run.results == [2, 4, 6] and len(run.times) == 2
    tp = Throughput.from_step_times([1.0, 2.0, 4.0], 8)
    assert (tp.median, tp.low, tp.high) == (4.0, 2.0, 8.0)
    assert markdown_table(["a", "b"], [[1, "x|y"]]).splitlines()[2] == "| 1 | x\\|y |"


def test_overrides_parse_field_types() -> None:
    cfg = bench.config_from_overrides(["vocab_size=128", "lr=0.5"], steps=3, warmup_steps=1)
    assert (cfg.vocab_size, cfg.lr, cfg.steps) == (128, 0.5, 3)
    with pytest.raises(SystemExit):
        bench.config_from_overrides(["nope=1"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_benchmark_end_to_end_tiny(tmp_path: Path) -> None:
    """Every launcher on a tiny model: all peers train exactly the single-process model."""
    proc = subprocess.run([sys.executable, "benchmarks/pipeline_throughput.py", "--quick",
                           "--out-dir", str(tmp_path), "--timeout", "600", "--set", *TINY_OVERRIDES],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "pipeline_throughput.md").read_text()
    for name in ("single-process", "deepspeed-pipe", "torch-pipelining-1f1b"):
        row = next(line for line in report.splitlines() if line.startswith(f"| `{name}`"))
        assert row.endswith("| ok |"), row
    assert (tmp_path / "pipeline_throughput.png").stat().st_size > 0
