"""python -m merak.planner: the planner's ranking, its memory guarantee and its errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from merak.planner.cli import build_cluster, main, plan
from merak.planner.search import SearchSpace
from merak.planner.simulator import TracedModel

CONFIG = ["gpt2", "n_layer=8", "n_embd=256", "n_head=8", "vocab_size=8192"]
SPACE = SearchSpace(micro_batches=(1, 2, 4), tp_sub_microbatches=(1, 2))


@pytest.fixture(scope="module")
def model() -> TracedModel:
    return TracedModel.from_config(CONFIG, seq_len=512)


@pytest.mark.parametrize("memory", ["1GB", "2GB", "4GB"])
def test_planner_never_returns_a_layout_over_the_budget(model: TracedModel, memory: str) -> None:
    cluster = build_cluster("a100-80gb", 8, 8, memory)
    cluster = dataclasses.replace(cluster, device=dataclasses.replace(cluster.device, reserved_bytes=0.0))
    result = plan(model, cluster, global_batch=64, space=SPACE, top=5)
    assert result.best, "some layout fits"
    for p in result.best:
        assert p.fits and p.peak_memory_bytes <= cluster.device.usable_bytes, p.strategy.label()
        assert p.strategy.dp * p.strategy.tp * p.strategy.pp == 8
    times = [p.step_seconds for p in result.best]
    assert times == sorted(times)  # fastest first
    rows = [(p.strategy.dp, p.strategy.tp, p.strategy.pp, p.strategy.micro_batch, p.strategy.tp_sub_microbatches,
             p.step_seconds, p.peak_memory_bytes) for p in result.best]
    assert len(set(rows)) == len(rows)  # no two rows predict the same numbers for the same layout


def test_cli_prints_top_layouts_as_json(capsys) -> None:
    code = main(["--config", *CONFIG, "--gpus", "8", "--gpu-memory", "80GB", "--global-batch", "64", "--seq", "512",
                 "--micro-batches", "1", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert 1 <= len(out["top"]) <= 5 and out["candidates"] > len(out["top"])
    assert {"step_seconds", "mfu", "peak_memory_bytes", "strategy", "fits"} <= set(out["top"][0])


def test_cli_refuses_when_nothing_fits(capsys) -> None:
    code = main(["--config", *CONFIG, "--gpus", "8", "--gpu-memory", "2.001GB", "--global-batch", "64",
                 "--seq", "512", "--micro-batches", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no layout" in err and "over memory" in err and "--global-batch" in err


def test_bad_cluster_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="whole number of nodes"):
        build_cluster("a100-80gb", 12, 8, None)
