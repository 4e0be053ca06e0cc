"""The demo: its data pieces (fast) and one short end-to-end run under the deepspeed launcher."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_harness import free_port
from merak.launch import demo, demo_data


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A private cache holding one tokenizer trained for the whole module (training takes seconds)."""
    directory = tmp_path_factory.mktemp("tok")
    demo_data.ensure_tokenizer_file(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(cache):
    return demo_data.load_tokenizer(cache)


@pytest.mark.parametrize("text", [
    "The for statement is used to iterate over the elements of a sequence.",
    "def f(x):\n    return x ** 2  # tabs\tand   spaces",
    "unicode: naïve café — 数字 🙂",
])
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE loses nothing
    assert len(ids) < len(text.encode("utf-8"))  # and it did learn merges


def test_tokenizer_vocabulary_and_special_token(tokenizer):
    assert len(tokenizer) == demo_data.VOCAB_SIZE
    eos = tokenizer.convert_tokens_to_ids(demo_data.EOS)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == eos
    assert tokenizer(demo_data.EOS)["input_ids"] == [eos]  # one token, never split
    assert tokenizer.decode([eos], skip_special_tokens=True) == ""


def test_cached_tokenizer_is_not_retrained(cache, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a cached tokenizer must not be trained again")

    monkeypatch.setattr(demo_data, "_train_to", refuse)
    cached = demo_data.ensure_tokenizer_file(cache)
    assert cached.parent == cache
    monkeypatch.setenv("MERAK_CACHE", str(cache))
    assert demo_data.tokenizer_path() == cached  # the env override picks the same cache


def test_datasets_shapes_split_and_determinism(tokenizer):
    train, evaluation = demo_data.build_datasets(tokenizer)
    again_train, again_eval = demo_data.build_datasets(tokenizer)
    assert torch.equal(train.blocks, again_train.blocks) and torch.equal(evaluation.blocks, again_eval.blocks)
    assert len(train) > 10 * len(evaluation) > 0
    item = train[0]
    assert set(item) == {"input_ids", "labels"}
    assert item["input_ids"].shape == (demo_data.SEQ_LEN,) and item["input_ids"].dtype == torch.long
    assert torch.equal(item["input_ids"], item["labels"])
    rows = {tuple(b.tolist()) for b in train.blocks}
    assert not rows & {tuple(b.tolist()) for b in evaluation.blocks}  # disjoint split
    other_train, _ = demo_data.build_datasets(tokenizer, seed=1)
    assert not torch.equal(other_train.blocks, train.blocks)  # the seed drives the split


def _first_run_on_rank(directory: str) -> tuple[int, str]:
    """One of several ranks starting on an empty cache: (did it train?, digest of what it read)."""
    trained = []
    original = demo_data._train_to

    def counting(*args, **kwargs):
        trained.append(1)
        return original(*args, **kwargs)

    demo_data._train_to = counting
    path = demo_data.ensure_tokenizer_file(Path(directory))
    return len(trained), hashlib.sha256(path.read_bytes()).hexdigest()


def test_concurrent_first_run_trains_once(dist_run, tmp_path):
    results = dist_run(_first_run_on_rank, 2, str(tmp_path), timeout=120)
    assert sum(trained for trained, _ in results) == 1, results
    assert len({digest for _, digest in results}) == 1
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_demo_command_line():
    args = demo.parse_args(["--pp", "2", "--steps", "5", "--local_rank=0"])  # deepspeed's extra
    assert (args.pp, args.steps, args.micro_batch_size) == (2, 5, 4)
    with pytest.raises(SystemExit):
        demo.parse_args(["--step", "5"])  # a typo must not train 200 steps silently


def test_demo_model_is_built_on_meta(tokenizer):
    model = demo.build_model(len(tokenizer), tokenizer.eos_token_id, demo.parse_args([]))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.config.n_layer == 6 and model.config.n_embd == 256
    assert model.config.vocab_size == demo_data.VOCAB_SIZE


def test_demo_end_to_end_under_deepspeed_launcher(tmp_path):
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", str(free_port()), "--module", "merak.launch.demo",
           "--pp", "2", "--steps", "5", "--logging-steps", "1",
           "--max-new-tokens", "20", "--output-dir", str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MERAK_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "layout dp=1 tp=1 pp=2 on 2 ranks" in out
    assert "partition plan" in out and "2 stages" in out, out[-4000:]
    losses = [float(x) for x in re.findall(r"'loss': '?([0-9.]+)", out)]
    assert len(losses) >= 5, out[-4000:]
    assert "trained 5 steps" in out
    sample = out.split("sample (HF generate from the export):\n", 1)[1]
    assert sample.startswith(demo.PROMPT), sample[:500]
    assert (out_dir / "model" / "config.json").exists()
    assert (out_dir / "model" / "tokenizer.json").exists()
