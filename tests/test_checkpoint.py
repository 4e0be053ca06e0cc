"""Checkpoints: exact resume, Hugging Face export and import, on real pipeline layouts.

One training job per layout serves several tests (process start-up dominates on CPU):

* the *first* job builds a meta GPT-2 / LLaMA, loads a ``save_pretrained`` directory of a tiny
  model with known weights into its stages, trains ``STEPS`` steps with AdamW and a warm-up/decay
  scheduler and saves a checkpoint before step ``SAVE_AT``;
* the *resumed* job (a fresh process group) builds the stages with other initial weights and
  other RNG seeds, loads the checkpoint, trains the remaining steps and exports the model.

Importing transformers in every rank costs far more than the training here, so the default run
spawns its ranks once: every job of every default layout runs in the same rank processes, each
in a new process group (``merak.shutdown()`` then ``merak.init``); the slow variants start new
processes for every job.

Every RNG the checkpoint restores (python, numpy, torch) decides each step's data, so a resume
that restored any of them wrongly would change the losses; they must match bitwise.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dist_harness import run_distributed
from tiny_models import tiny_model

MICRO, SEQ, M, STEPS, SAVE_AT, LR = 2, 8, 2, 5, 3, 1e-2
FRESH_SEED, OTHER_SEED = 1234, 7  # build_stage seeds of the first and the resumed job


def _seed_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _draw_batch_seed() -> int:
    return random.randrange(1 << 20) ^ int(np.random.randint(1 << 20)) ^ int(torch.randint(1 << 20, ()))


def _microbatches(make_batch: Any, seed: int) -> list[dict[str, torch.Tensor]]:
    return [make_batch(batch_size=MICRO, seq_len=SEQ, seed=seed * M + i) for i in range(M)]


def _plan(kind: str, pp: int, meta: bool, seed: int = 0) -> tuple[Any, Any, Any]:
    from merak.partitioner import shard, trace

    model, make_batch = tiny_model(kind, meta=meta, seed=seed)
    return model, make_batch, shard(trace(model, make_batch(batch_size=MICRO, seq_len=SEQ, seed=0)), pp)


def _train(kind: str, dp: int, pp: int, root: str, resume: bool) -> dict[str, Any]:
    """One rank of the first (``resume=False``) or the resumed training job."""
    from transformers import get_linear_schedule_with_warmup

    import merak
    from merak.checkpoint import export_pretrained, load_checkpoint, load_pretrained_weights, save_checkpoint
    from merak.partitioner import build_stage
    from merak.runtime.pipeline.executor import PipelineExecutor, all_reduce_mean_loss
    from merak.runtime.memory.recompute_plan import RecomputePlan
    from merak.runtime.pipeline.schedule import build

    grid = merak.init(dp=dp, pp=pp)
    model, make_batch, plan = _plan(kind, pp, meta=True)
    stage = build_stage(plan, grid.stage_id, seed=OTHER_SEED if resume else FRESH_SEED)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=LR, weight_decay=0.1)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=STEPS)
    out: dict[str, Any] = {"stage": grid.stage_id, "dp": grid.coord.dp, "tied": dict(stage.tied_parameters),
                           "own_keys": list(stage.state_dict())}
    ckpt = Path(root) / "ckpt"
    if resume:
        _seed_rngs(999)  # wrong on purpose: the checkpoint's states must replace these
        extra = load_checkpoint(ckpt, stage=stage, grid=grid, optimizer=optimizer, lr_scheduler=scheduler)
        start = extra["global_step"]
    else:
        _seed_rngs(grid.coord.dp)  # the ranks of one pipeline draw the same data
        out["loaded_keys"] = load_pretrained_weights(stage, Path(root) / "hf")
        start = 0
    executor = PipelineExecutor(stage, grid, optimizer)
    instructions = build("1f1b", pp, M, grid.stage_id, RecomputePlan.from_mode("none", pp))
    out["losses"], out["seeds"] = [], []
    for step in range(start, STEPS):
        if step == SAVE_AT and not resume:
            save_checkpoint(ckpt, stage=stage, grid=grid, optimizer=optimizer, lr_scheduler=scheduler,
                            extra={"global_step": step})
        seed = _draw_batch_seed()
        out["seeds"].append(seed)
        result = executor.run(instructions, _microbatches(make_batch, seed))
        out["losses"].append(all_reduce_mean_loss(result.loss, grid))
        scheduler.step()
    if resume:
        export_pretrained(Path(root) / "export", stage=stage, grid=grid, model=model)
        out["state"] = {k: v.detach().clone() for k, v in stage.state_dict().items()}
    return out


def _new_process_group(world_size: int) -> None:
    """Tear the process group down so the next ``merak.init`` builds a fresh one of
    ``world_size`` ranks (this rank sits out if its rank is not below it), on a new port:
    re-using the old one races with the old store's shutdown."""
    import torch.distributed as dist

    import merak
    from dist_harness import free_port

    port = [free_port() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(port, src=0)
    os.environ.update(MASTER_PORT=str(port[0]), WORLD_SIZE=str(world_size))
    dist.barrier()
    merak.shutdown()


def _layouts_in_turn(layouts: list[tuple[str, int, int]], roots: list[str]) -> list[tuple[dict, dict]]:
    """Both jobs of every layout (largest first), each in a fresh process group, in this one rank
    process; returns (first, resumed) per layout this rank took part in."""
    results = []
    for i, ((kind, dp, pp), root) in enumerate(zip(layouts, roots)):
        first = _train(kind, dp, pp, root, False)
        _new_process_group(dp * pp)
        results.append((first, _train(kind, dp, pp, root, True)))
        if i + 1 == len(layouts):
            break
        _, next_dp, next_pp = layouts[i + 1]
        _new_process_group(next_dp * next_pp)
        if int(os.environ["RANK"]) >= next_dp * next_pp:
            break
    return results


def _prepare(kind: str, dp: int, pp: int, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp(f"{kind}-dp{dp}-pp{pp}")
    reference, make_batch = tiny_model(kind, seed=0)  # the known weights
    reference.save_pretrained(root / "hf")
    return SimpleNamespace(kind=kind, dp=dp, pp=pp, root=root, reference=reference, make_batch=make_batch)


# Layouts of the default run share one set of rank processes (largest first); the slow ones
# start new processes for every job.
DEFAULT_LAYOUTS = [("gpt2", 2, 2), ("llama", 1, 2)]
SLOW_LAYOUTS = [("gpt2", 1, 2), ("llama", 2, 2)]


@pytest.fixture(scope="module")
def default_jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int, int], SimpleNamespace]:
    jobs = {layout: _prepare(*layout, tmp_path_factory) for layout in DEFAULT_LAYOUTS}
    world = max(dp * pp for _, dp, pp in DEFAULT_LAYOUTS)
    per_rank = run_distributed(_layouts_in_turn, world, DEFAULT_LAYOUTS,
                               [str(jobs[layout].root) for layout in DEFAULT_LAYOUTS], timeout=300)
    for i, (layout, job) in enumerate(jobs.items()):
        job.first, job.resumed = zip(*(per_rank[rank][i] for rank in range(job.dp * job.pp)))
    return jobs


@pytest.fixture(scope="module", params=[
    *(pytest.param(layout, id=f"{layout[0]}-dp{layout[1]}-pp{layout[2]}") for layout in DEFAULT_LAYOUTS),
    *(pytest.param(layout, id=f"{layout[0]}-dp{layout[1]}-pp{layout[2]}-new-processes", marks=pytest.mark.slow)
      for layout in SLOW_LAYOUTS),
])
def job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    if request.param in DEFAULT_LAYOUTS:
        return request.getfixturevalue("default_jobs")[request.param]
    job = _prepare(*request.param, tmp_path_factory)
    world = job.dp * job.pp
    job.first = run_distributed(_train, world, job.kind, job.dp, job.pp, str(job.root), False, timeout=300)
    job.resumed = run_distributed(_train, world, job.kind, job.dp, job.pp, str(job.root), True, timeout=300)
    return job


def test_resume_is_bitwise_identical(job):
    for rank, (first, resumed) in enumerate(zip(job.first, job.resumed)):
        assert resumed["seeds"] == first["seeds"][SAVE_AT:], f"rank {rank}: RNG states not restored"
        assert resumed["losses"] == first["losses"][SAVE_AT:], f"rank {rank}"
    losses = job.first[0]["losses"]
    assert len(set(losses)) == len(losses), "the model did not train"


def _saved_keys(ckpt: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata)


def test_checkpoint_is_one_dcp_state_keyed_by_model_names(job):
    ckpt = job.root / "ckpt"
    layout = json.loads((ckpt / "layout.json").read_text())
    assert layout["dims"] == {"dp": job.dp, "tp": 1, "pp": job.pp}
    assert layout["optimizer"] and layout["lr_scheduler"]
    keys = _saved_keys(ckpt)
    model_keys = {k.split("::")[1] for k in keys if k.startswith("model::")}
    canonical = set()
    for out in job.first:
        inverse = {local: key for key, local in out["tied"].items()}
        canonical |= {inverse.get(name, name) for name in out["own_keys"]}
    assert model_keys == canonical == _keys_of(job.root / "hf" / "model.safetensors")
    assert {k for k in keys if k.startswith("rng::")} == {
        f"rng::pp{o['stage']:02d}-dp{o['dp']:02d}-tp00" for o in job.first}
    assert "lr_scheduler" in keys and any(k.endswith("::exp_avg::") for k in keys)
    # every writing rank wrote its own file; replicas and tied copies were written once
    assert (ckpt / "dcp" / ".metadata").exists() and list((ckpt / "dcp").glob("*.distcp"))
    assert json.loads((ckpt / "extra.json").read_text()) == {"global_step": SAVE_AT}
    assert not [p.name for p in job.root.iterdir() if "merak-" in p.name], "staging left behind"


def test_hf_weights_into_meta_layout(job):
    # Each stage read exactly its own tensors, under the file's names (tied head -> embedding).
    file_keys = _keys_of(job.root / "hf" / "model.safetensors")
    read_by_stage: dict[int, set[str]] = {}
    for out in job.first:
        canonical = {local: key for key, local in out["tied"].items()}
        expected = {canonical.get(name, name) for name in out["own_keys"]}
        assert set(out["loaded_keys"]) == expected
        read_by_stage.setdefault(out["stage"], set(out["loaded_keys"]))
    assert set().union(*read_by_stage.values()) == file_keys
    shared = set.intersection(*read_by_stage.values())
    assert shared == ({"transformer.wte.weight"} if job.kind == "gpt2" else set())

    # The first step's loss is the single-process loss of the known weights on the same batch.
    replica_means = []
    for dp in range(job.dp):
        seed = next(o["seeds"][0] for o in job.first if o["dp"] == dp)
        with torch.no_grad():
            losses = [job.reference(**b).loss for b in _microbatches(job.make_batch, seed)]
        replica_means.append(float(torch.stack(losses).mean()))
    expected_loss = sum(replica_means) / job.dp
    assert job.first[0]["losses"][0] == pytest.approx(expected_loss, rel=1e-6, abs=0)


def _keys_of(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_export_loads_with_from_pretrained(job):
    from transformers import AutoModelForCausalLM

    from merak.partitioner import build_stage, run_sequentially

    export = job.root / "export"
    shards = [f"model-{k:05d}-of-{job.pp:05d}.safetensors" for k in range(1, job.pp + 1)]
    assert {p.name for p in export.iterdir()} == {"config.json", "generation_config.json",
                                                   "model.safetensors.index.json", *shards}
    # one shard per stage, written by the stage, holding only its tensors, named as HF names them
    weight_map = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == _keys_of(job.root / "hf" / "model.safetensors")
    for stage_id, shard in enumerate(shards):
        own = {o["stage"]: set(o["own_keys"]) for o in job.first}[stage_id]
        assert _keys_of(export / shard) <= own and {n for n, f in weight_map.items() if f == shard} == _keys_of(export / shard)
    exported = AutoModelForCausalLM.from_pretrained(export)
    assert type(exported) is type(job.reference)
    exported_state = exported.state_dict()
    trained = {out["stage"]: out["state"] for out in job.resumed if out["dp"] == 0}
    for stage_id, state in trained.items():
        for name, value in state.items():
            assert torch.equal(exported_state[name], value), f"stage {stage_id}: {name}"

    # Logits of the export equal those of the trained stages run one after another.
    _, make_batch, plan = _plan(job.kind, job.pp, meta=False, seed=3)
    stages = [build_stage(plan, s) for s in range(job.pp)]
    for stage in stages:
        stage.load_state_dict(trained[stage.stage_id])
    batch = make_batch(batch_size=2, seq_len=SEQ, seed=42)
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, run_sequentially(stages, batch)["logits"],
                                   rtol=1e-5, atol=1e-6)


# ---- single-process tests (a one-rank grid needs no process group) ---------------------------
def _one_rank_grid() -> Any:
    from merak.runtime.distributed.grid import Grid, ParallelDims

    return Grid(ParallelDims(), rank=0)


def _trained_single_stage(kind: str = "gpt2", **overrides: Any) -> tuple[Any, torch.optim.Optimizer, dict]:
    """A one-stage pipeline (holding both names of a tied weight) after one AdamW step."""
    from merak.partitioner import build_stage, shard, trace

    model, make_batch = tiny_model(kind, **overrides)
    batch = make_batch(batch_size=MICRO, seq_len=SEQ, seed=0)
    stage = build_stage(shard(trace(model, batch), 1), 0)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=LR)
    stage(batch, {})["loss"].backward()
    optimizer.step()
    return stage, optimizer, batch


def test_tied_weights_stored_once_and_restored(tmp_path):
    from merak.checkpoint import load_checkpoint, save_checkpoint

    stage, optimizer, _ = _trained_single_stage()
    grid = _one_rank_grid()
    save_checkpoint(tmp_path / "ckpt", stage=stage, grid=grid, optimizer=optimizer, extra={"global_step": 1})
    model_keys = {k.split("::")[1] for k in _saved_keys(tmp_path / "ckpt") if k.startswith("model::")}
    assert "transformer.wte.weight" in model_keys and "lm_head.weight" not in model_keys
    draws = (random.random(), float(np.random.rand()), torch.rand(1))
    saved_weights = {k: v.clone() for k, v in stage.state_dict().items()}
    saved_moments = {k: v.clone() for k, v in optimizer.state[stage.lm_head.weight].items()}
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(1.0)
    optimizer.state.clear()

    assert load_checkpoint(tmp_path / "ckpt", stage=stage, grid=grid, optimizer=optimizer) == {"global_step": 1}
    assert (random.random(), float(np.random.rand())) == draws[:2] and torch.equal(torch.rand(1), draws[2])
    for name, value in stage.state_dict().items():
        assert torch.equal(value, saved_weights[name]), name
    assert stage.lm_head.weight is stage.transformer.wte.weight, "load broke the tie"
    for key, value in optimizer.state[stage.lm_head.weight].items():
        assert torch.equal(value, saved_moments[key]), key


def test_async_save_writes_the_state_of_its_call(tmp_path):
    from merak.checkpoint import is_complete, load_checkpoint, save_checkpoint

    stage, optimizer, _ = _trained_single_stage()
    grid, ckpt = _one_rank_grid(), tmp_path / "ckpt"
    saved = {k: v.clone() for k, v in stage.state_dict().items()}
    pending = save_checkpoint(ckpt, stage=stage, grid=grid, optimizer=optimizer, extra={"global_step": 1},
                              async_save=True)
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(1.0)  # training goes on while the checkpoint is written
    assert not is_complete(ckpt), "published before wait()"
    pending.wait()
    assert is_complete(ckpt)
    assert load_checkpoint(ckpt, stage=stage, grid=grid, optimizer=optimizer) == {"global_step": 1}
    for name, value in stage.state_dict().items():
        assert torch.equal(value, saved[name]), name


class _BrokenScheduler:
    def state_dict(self) -> dict:
        raise RuntimeError("disk full")


def test_save_is_atomic_and_keeps_foreign_files(tmp_path):
    from merak.checkpoint import load_checkpoint, save_checkpoint

    stage, optimizer, _ = _trained_single_stage()
    grid, ckpt = _one_rank_grid(), tmp_path / "ckpt"
    save_checkpoint(ckpt, stage=stage, grid=grid, extra={"global_step": 1})
    (ckpt / "trainer_state.json").write_text("{}")  # written by the trainer beside ours
    save_checkpoint(ckpt, stage=stage, grid=grid, optimizer=optimizer, extra={"global_step": 2})
    assert (ckpt / "trainer_state.json").exists()

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(ckpt, stage=stage, grid=grid, lr_scheduler=_BrokenScheduler(), extra={"global_step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "staging left behind"
    assert load_checkpoint(ckpt, stage=stage, grid=grid, optimizer=optimizer) == {"global_step": 2}


def test_another_model_and_missing_optimizer_raise(tmp_path):
    from merak.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    stage, optimizer, _ = _trained_single_stage()
    grid = _one_rank_grid()
    save_checkpoint(tmp_path / "ckpt", stage=stage, grid=grid)
    with pytest.raises(CheckpointError, match="without optimizer state"):
        load_checkpoint(tmp_path / "ckpt", stage=stage, grid=grid, optimizer=optimizer)
    smaller, _, _ = _trained_single_stage(n_layer=2)
    with pytest.raises(CheckpointError, match="another model") as err:
        load_checkpoint(tmp_path / "ckpt", stage=smaller, grid=grid)
    assert "unexpected ['transformer.h.2.attn.c_attn.bias'" in str(err.value)
    with pytest.raises(CheckpointError, match="not a Merak checkpoint"):
        load_checkpoint(tmp_path, stage=stage, grid=grid)


def test_missing_hf_keys_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    from merak.checkpoint import CheckpointError, load_pretrained_weights
    from merak.partitioner import build_stage

    model, _, plan = _plan("llama", 2, meta=False)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.norm.weight"], state["lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert load_pretrained_weights(build_stage(plan, 0), tmp_path)  # stage 0 needs neither
    with pytest.raises(CheckpointError, match=r"lacks 2 tensor\(s\) of stage 1") as err:
        load_pretrained_weights(build_stage(plan, 1), tmp_path)
    assert "model.norm.weight" in str(err.value) and "lm_head.weight" in str(err.value)
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_pretrained_weights(build_stage(plan, 1), tmp_path / "nowhere")


def test_sharded_hf_checkpoint_opens_only_own_files(tmp_path, monkeypatch):
    import merak.checkpoint as ckpt
    from merak.partitioner import build_stage

    reference, _ = tiny_model("gpt2", seed=0)
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    opened: list[str] = []
    real_safe_open = ckpt.safe_open

    def recording_safe_open(path: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).name)
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "safe_open", recording_safe_open)
    _, _, plan = _plan("gpt2", 2, meta=True)
    known = reference.state_dict()
    for stage_id in range(2):
        stage = build_stage(plan, stage_id, seed=FRESH_SEED)
        opened.clear()
        keys = ckpt.load_pretrained_weights(stage, tmp_path)
        assert sorted(opened) == sorted({weight_map[k] for k in keys})
        for name, value in stage.state_dict().items():
            assert torch.equal(value, known[name]), name
    assert "lm_head.weight" not in weight_map and "transformer.wte.weight" in keys  # the tied head


def test_export_into_output_dir_keeps_other_files(tmp_path):
    from transformers import AutoModelForCausalLM

    from merak.checkpoint import export_pretrained

    stage, _, _ = _trained_single_stage()
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "tokenizer.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an earlier export")
    model, _ = tiny_model("gpt2", meta=True)
    export_pretrained(out, stage=stage, grid=_one_rank_grid(), model=model)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-1", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.lm_head.weight is exported.transformer.wte.weight
    assert torch.equal(exported.lm_head.weight, stage.lm_head.weight.detach())


def test_export_of_plain_module_and_of_a_foreign_model(tmp_path):
    from safetensors.torch import load_file

    from merak.checkpoint import CheckpointError, export_pretrained

    stage, _, _ = _trained_single_stage("mlp")
    model, _ = tiny_model("mlp", meta=True)  # a plain nn.Module: no save_pretrained
    export_pretrained(tmp_path / "mlp", stage=stage, grid=_one_rank_grid(), model=model)
    exported = load_file(tmp_path / "mlp" / "model.safetensors")
    assert exported.keys() == stage.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in stage.state_dict().items())

    llama, _ = tiny_model("llama", meta=True)
    with pytest.raises(CheckpointError, match="do not fit the model"):
        export_pretrained(tmp_path / "wrong", stage=stage, grid=_one_rank_grid(), model=llama)
    assert not (tmp_path / "wrong" / "model.safetensors").exists()


@pytest.mark.parametrize("kind, auto_class", [("bert", "AutoModelForMaskedLM"), ("t5", "AutoModelForSeq2SeqLM")])
def test_single_stage_export_round_trips(tmp_path, kind, auto_class):
    import transformers

    from merak.checkpoint import export_pretrained, load_pretrained_weights

    stage, _, batch = _trained_single_stage(kind)
    model, _ = tiny_model(kind, meta=True)
    export_pretrained(tmp_path, stage=stage, grid=_one_rank_grid(), model=model)
    exported = getattr(transformers, auto_class).from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, stage(batch, {})["logits"], rtol=1e-5, atol=1e-6)
    # The export is an import source too; BERT's head bias is stored under one of its two names.
    trained = {k: v.clone() for k, v in stage.state_dict().items()}
    fresh, _, _ = _trained_single_stage(kind, seed=5)
    assert not all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    load_pretrained_weights(fresh, tmp_path)
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())


def test_load_reads_weights_and_optimizer_states_in_place(tmp_path):
    """No second copy of the stage or its optimizer states while loading: DCP reads into the live
    tensors (the optimizer keeps them), which hold the saved values afterwards."""
    from merak.checkpoint import load_checkpoint, save_checkpoint

    stage, optimizer, _ = _trained_single_stage()
    grid, ckpt = _one_rank_grid(), tmp_path / "ckpt"
    save_checkpoint(ckpt, stage=stage, grid=grid, optimizer=optimizer, extra={"global_step": 1})
    saved = {(id(p), k): v.clone() for p, s in optimizer.state.items() for k, v in s.items()}
    weights = {k: v.clone() for k, v in stage.state_dict().items()}
    live = {(id(p), k): v for p, s in optimizer.state.items() for k, v in s.items()}
    with torch.no_grad():
        for value in [*live.values(), *stage.parameters()]:
            value.add_(1.0)
    load_checkpoint(ckpt, stage=stage, grid=grid, optimizer=optimizer)
    now = {(id(p), k): v for p, s in optimizer.state.items() for k, v in s.items()}
    assert now.keys() == saved.keys()
    for key, value in now.items():
        assert value.data_ptr() == live[key].data_ptr(), f"{key[1]}: read into a new tensor"
        assert torch.equal(value, saved[key]), key[1]
    for name, value in stage.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_direct_reader_reads_contiguous_items_into_their_destinations(tmp_path):
    """merak.dcp_reader: one read per whole contiguous tensor into its destination (through a host
    tensor for a strided one, the path a GPU destination takes); every other item (a view of a
    larger storage, or a checkpoint not marked contiguous) goes DCP's way."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

    from merak.dcp_reader import DirectReader

    source = {"matrix": torch.randn(5, 7), "step": torch.tensor(3.0), "ids": torch.arange(10),
              "empty": torch.empty(0), "half": torch.randn(4, 4).to(torch.bfloat16),
              "bytes": torch.frombuffer(bytearray(b"hello"), dtype=torch.uint8),
              "view": torch.randn(10)[2:5]}  # its storage (10 floats) is larger than the tensor
    dcp.save(source, storage_writer=FileSystemWriter(str(tmp_path)), planner=DefaultSavePlanner(flatten_state_dict=False),
             no_dist=True)
    for contiguous, direct in ((True, len(source) - 1), (False, 0)):
        loaded = {k: torch.zeros_like(v) for k, v in source.items()}
        loaded["matrix"] = torch.zeros(7, 5).t()  # a strided destination: through a host tensor
        reader = DirectReader(str(tmp_path), contiguous=contiguous)
        dcp.load(loaded, storage_reader=reader, planner=DefaultLoadPlanner(flatten_state_dict=False), no_dist=True)
        assert reader.direct_items == direct
        for name, value in source.items():
            assert torch.equal(loaded[name], value), name
