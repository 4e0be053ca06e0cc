"""Checkpoints of a pipeline-parallel job: sharded save / exact resume, HF export, HF import.

Three jobs, three formats:

* **Resume** (:func:`save_checkpoint` / :func:`load_checkpoint`) uses Merak's own *sharded*
  format: one directory per rank, named by its grid coordinate (``pp00-dp01-tp00``). Why shards:
  a stage's weights and optimizer state already live on its own rank, so every rank writes (and
  later reads) only what it holds - nothing is gathered, the save costs no more memory than
  training and scales with the number of stages. Why coordinates in the names: a later
  tensor-parallel layout adds ``tp`` shards without changing the format.
* **Export** (:func:`export_pretrained`) consolidates all stages into the user's original model
  and writes the Hugging Face ``save_pretrained`` format, which any layout (or plain
  ``from_pretrained``) can read.
* **Import** (:func:`load_pretrained_weights`) fills one stage from a ``save_pretrained``
  directory, opening only the files and keys the stage owns.

Layout of a checkpoint directory::

    layout.json            grid dims, world size, per-stage tensor names (written last: rank 0)
    extra.json             the caller's JSON state (global step, data position ...)
    pp00-dp00-tp00/        model.safetensors  optimizer.pt  scheduler.pt  rng.pt
    pp00-dp01-tp00/        rng.pt             (+ optimizer.pt: its ZeRO-1 shard)
    ...

Decisions worth knowing:

* **Only dp-rank 0 writes weights and optimizer state.** Data-parallel replicas of a stage hold
  bitwise-identical weights and optimizer states (gradients are averaged before every step), so
  writing them once per stage is enough; every DP replica reads that one copy back. Under ZeRO-1
  (:mod:`merak.runtime.memory.zero`) each DP rank holds a different shard of the optimizer state, so
  each writes and reads its own ``optimizer.pt`` (``layout.json``: ``"optimizer_sharded": true``).
* **Optimizer state is matched by parameter name.** Each ``optimizer.pt`` records the names of
  the parameters its states belong to and the parameter groups' hyper-parameters (learning rate
  as the scheduler left it ...). When the current optimizer holds exactly those parameters the
  state loads as is; otherwise (a ZeRO-1 checkpoint resumed without ZeRO, or the reverse) the
  stage's files are merged by name, so every parameter gets its own moments back exactly.
  *Every* rank writes its RNG states: replicas draw different random numbers, and a resume that
  is bitwise identical needs each rank's own generators back.
* **Atomic saves.** All ranks write into a staging directory beside the target; after all of
  them succeeded, rank 0 writes ``layout.json`` and renames the staging directory onto the
  target. A crash mid-save therefore never leaves a half-written checkpoint under the final name,
  and an older checkpoint of the same name stays loadable until the new one is complete. Files
  that other code (the trainer's ``trainer_state.json``) put in the target directory are kept.
  The staging directory must be on a file system every rank sees (as for any multi-node job).
  An export goes through a staging directory too, but is moved into place file by file: its
  target is usually the training output directory, which holds checkpoints and logs and so must
  not be renamed as a whole.
* **Failures are collective.** A rank that fails to write or read still joins a final
  agreement step, so every rank raises (naming the failing ranks) instead of the healthy ones
  hanging in the next collective.
* **Tied / shared tensors** (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) are
  stored once per file - safetensors refuses aliased storage - and the other names are recorded
  as aliases in the file's metadata.
* A checkpoint resumes only under the layout that wrote it (same dp, tp, pp and partition);
  anything else raises :class:`CheckpointError` saying what to do. Changing layout goes through
  export + import (weights only).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from merak.runtime.distributed.grid import Coord, Grid
from merak.runtime.distributed.p2p import P2P, wait_with_timeout
from merak.runtime.memory.zero import is_sharded, local_optimizer

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "export_pretrained",
    "load_pretrained_weights",
    "rank_dir_name",
]

FORMAT = "merak-checkpoint"
FORMAT_VERSION = 1
LAYOUT_FILE = "layout.json"
EXTRA_FILE = "extra.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
_ALIASES_KEY = "merak.aliases"  # safetensors metadata: {alias name: stored name}
_TIED_KEY = "merak.tied"  # safetensors metadata: the stage's tied_parameters
_RANK_DIR = re.compile(r"^pp\d+-dp\d+-tp\d+$")
# What a Hugging Face export owns in its directory; anything else there (a tokenizer) is kept.
_HF_OWNED = re.compile(r"^(model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?|"
                       r"config\.json|generation_config\.json)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or applied; the message says why and what to do."""


def rank_dir_name(coord: Coord) -> str:
    """Directory of one rank's shard, e.g. ``pp01-dp00-tp00`` (zero-padded so listings sort)."""
    return f"pp{coord.pp:02d}-dp{coord.dp:02d}-tp{coord.tp:02d}"


# ---- collectives -----------------------------------------------------------------------------
def _timeout_s() -> float:
    from merak.initialize import DEFAULT_TIMEOUT_S

    return DEFAULT_TIMEOUT_S


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(error: BaseException | None, what: str) -> None:
    """Collective: every rank learns which ranks failed ``what``; all raise if any did.

    Also serves as the barrier that ends each phase, so a failing rank never leaves its peers
    waiting in a later collective.
    """
    world = _world()
    if world > 1:
        failed = torch.zeros(world, dtype=torch.int32, device=_comm_device())
        failed[dist.get_rank()] = int(error is not None)
        work = dist.all_reduce(failed, async_op=True)
        wait_with_timeout(work, _timeout_s(), f"the other ranks to finish {what}")
        ranks = [r for r, bad in enumerate(failed.tolist()) if bad]
    else:
        ranks = [0] if error is not None else []
    if error is not None:
        raise error
    if ranks:
        raise CheckpointError(f"{what} failed on rank(s) {ranks}; see their error messages")


def _run_phase(what: str, work: Callable[[], Any]) -> Any:
    """Run ``work`` on this rank, then :func:`_agree` on the outcome with all ranks."""
    error: BaseException | None = None
    result = None
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - reported collectively, re-raised just below
        error = exc
    _agree(error, what)
    return result


# ---- files -----------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    """Flush ``path`` to stable storage, so the rename that publishes it never exposes empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _staging_path(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.merak-staging"


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _fsync_files(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_file():
            _fsync(entry)


def _publish_dir(staging: Path, directory: Path, owned: Callable[[str], bool]) -> None:
    """Replace ``directory`` by ``staging`` with one rename, first moving into staging the
    entries of ``directory`` that ``owned`` does not claim (files other code wrote there)."""
    _fsync_files(staging)
    if directory.exists():
        for entry in directory.iterdir():
            if not owned(entry.name) and not (staging / entry.name).exists():
                entry.rename(staging / entry.name)
        retired = directory.parent / f".{directory.name}.merak-retired"
        shutil.rmtree(retired, ignore_errors=True)
        directory.rename(retired)
        staging.rename(directory)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(directory)
    _fsync(directory.parent)


def _publish_files(staging: Path, directory: Path, owned: Callable[[str], bool]) -> None:
    """Move the files of ``staging`` into ``directory`` with one atomic rename each, then delete
    the entries ``owned`` claims that the new set lacks (a previous export's extra shards).

    For targets that hold other things (a training output directory with checkpoints and logs),
    which must not be renamed as a whole. JSON files (config, shard index) go last, so a reader
    that sees the new config or index also finds the new weights.
    """
    _fsync_files(staging)
    directory.mkdir(parents=True, exist_ok=True)
    new = sorted(p.name for p in staging.iterdir())
    for name in sorted(new, key=lambda n: n.endswith(".json")):
        os.replace(staging / name, directory / name)
    for entry in directory.iterdir():
        if owned(entry.name) and entry.name not in new and entry.is_file():
            entry.unlink()
    staging.rmdir()
    _fsync(directory)


def _checkpoint_owned(name: str) -> bool:
    return name in (LAYOUT_FILE, EXTRA_FILE) or bool(_RANK_DIR.match(name))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


# ---- stage tensors ---------------------------------------------------------------------------
def _unique_tensors(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into tensors to store (each storage once, on CPU) and ``{alias: stored}``.

    Exact aliases (same storage, offset, shape, stride, dtype: tied weights) are stored once.
    Distinct tensors that merely overlap one storage are stored as independent copies, since
    safetensors refuses shared storage and nothing in a module's state relies on such overlap.
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple[Any, ...], str] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if tensor.numel() > 0:
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                   tuple(tensor.stride()), tensor.dtype, tensor.device)
            if key in first_name:
                aliases[name] = first_name[key]
                continue
            first_name[key] = name
        stored[name] = tensor
    by_storage: dict[tuple[int, torch.device], list[str]] = collections.defaultdict(list)
    for name, tensor in stored.items():
        if tensor.numel() > 0:
            by_storage[(tensor.untyped_storage().data_ptr(), tensor.device)].append(name)
    overlapping = {name for names in by_storage.values() if len(names) > 1 for name in names}
    return {name: (t.clone() if name in overlapping else t).contiguous().cpu() for name, t in stored.items()}, aliases


def _save_stage(stage: nn.Module, path: Path) -> None:
    tensors, aliases = _unique_tensors(stage.state_dict())
    metadata = {"format": "pt", _ALIASES_KEY: json.dumps(aliases),
                _TIED_KEY: json.dumps(dict(getattr(stage, "tied_parameters", {})))}
    save_file(tensors, str(path), metadata=metadata)


def _read_stage_file(path: Path) -> dict[str, torch.Tensor]:
    """Every state-dict key of a saved stage (aliases expanded) -> tensor on CPU."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
        aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    state.update({alias: state[stored] for alias, stored in aliases.items()})
    return state


def _stage_file_names(path: Path) -> tuple[list[str], dict[str, str]]:
    """(state-dict keys, tied parameters) recorded in a stage file; reads only its header."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        names = [*f.keys(), *json.loads(metadata.get(_ALIASES_KEY, "{}"))]
    return sorted(names), json.loads(metadata.get(_TIED_KEY, "{}"))


def _mismatch(what: str, expected: Iterable[str], found: Iterable[str]) -> str:
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    return f"{what}: missing {missing[:20]}{' ...' if len(missing) > 20 else ''}, " \
           f"unexpected {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"


def _load_stage(stage: nn.Module, path: Path) -> None:
    state = _read_stage_file(path)
    expected = stage.state_dict().keys()
    if set(state) != set(expected):
        raise CheckpointError(
            _mismatch(f"{path} does not hold this stage's tensors", expected, state)
            + ". The model is partitioned differently than when the checkpoint was saved (another "
            "model, partition_method or stage count?); resume with the same partition."
        )
    stage.load_state_dict(state, strict=True)  # copies in place: optimizers keep their Parameters


# ---- optimizer, scheduler, RNG ---------------------------------------------------------------
def _optimizer_param_names(optimizer: torch.optim.Optimizer, stage: nn.Module) -> list[list[str]]:
    names = {id(p): n for n, p in stage.named_parameters()}
    return [[names.get(id(p), "<not a stage parameter>") for p in group["params"]] for group in optimizer.param_groups]


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _save_optimizer(optimizer: torch.optim.Optimizer, stage: nn.Module, path: Path) -> None:
    # Parameter names are stored beside the index-based state so that a resume whose optimizer
    # holds other parameters (ZeRO-1 on or off, another order) matches states by name instead
    # of giving Adam moments to the wrong tensors, or fails naming the missing ones. The
    # hyper-parameters are the optimizer's own: under ZeRO-1 the shard's local optimizer sees the
    # learning rate only at its next step, the wrapper holds what the scheduler set since.
    local = local_optimizer(optimizer)
    torch.save({"param_names": _optimizer_param_names(local, stage), "state": local.state_dict(),
                "hyperparameters": _hyperparameters(optimizer)}, path)


def _load_optimizer(optimizer: torch.optim.Optimizer, stage: nn.Module, paths: list[Path]) -> None:
    """Restore the state of the parameters this rank's optimizer holds from ``paths`` (the
    stage's one ``optimizer.pt``, or its DP ranks' ZeRO-1 shards, this rank's own first). Files
    are read until one holds exactly this optimizer's parameters, so a ZeRO-1 resume under the
    same layout reads only its own shard; otherwise every file is read and merged by name."""
    missing_files = [p for p in paths if not p.exists()]
    if missing_files:
        raise CheckpointError(f"{missing_files[0]} is missing: the checkpoint was saved without optimizer state; "
                              "load it with optimizer=None (weights only) or from a checkpoint that has it")
    local = local_optimizer(optimizer)
    current = _optimizer_param_names(local, stage)
    saved: list[dict[str, Any]] = []
    for path in paths:
        saved.append(torch.load(path, map_location="cpu", weights_only=True))
        if saved[-1]["param_names"] == current:
            local.load_state_dict(saved[-1]["state"])
            break
    else:
        local.load_state_dict(_merged_state(saved, current, paths))
    hyperparameters = saved[0].get("hyperparameters", [])
    for groups in {id(g): g for g in (optimizer.param_groups, local.param_groups)}.values():
        for group, values in zip(groups, hyperparameters):
            group.update(values)


def _merged_state(saved: list[dict[str, Any]], current: list[list[str]], paths: list[Path]) -> dict[str, Any]:
    """A ``state_dict`` for an optimizer over the parameters ``current`` (names per group), with
    each parameter's state taken by name from whichever saved file holds it."""
    by_name: dict[str, Any] = {}
    known: list[str] = []
    for entry in saved:
        names = [n for group in entry["param_names"] for n in group]
        known += names
        by_name.update({names[index]: value for index, value in entry["state"]["state"].items()})
    flat = [n for group in current for n in group]
    groups = saved[0]["state"]["param_groups"]
    if set(flat) - set(known) or len(groups) != len(current):
        raise CheckpointError(
            f"the optimizer's parameter groups differ from the saved ones ({', '.join(map(str, paths))}): saved "
            f"{[len(g) for g in saved[0]['param_names']]} parameters per group, now {[len(g) for g in current]}; "
            + _mismatch("parameters", known, flat)
            + ". Build the optimizer over the stage's parameters in the same groups and order as before."
        )
    indices = iter(range(len(flat)))
    param_groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [next(indices) for _ in names]}
                    for group, names in zip(groups, current)]
    return {"state": {i: by_name[n] for i, n in enumerate(flat) if n in by_name}, "param_groups": param_groups}


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's state as plain values and a tensor, so the file loads with weights_only=True
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            logger.warning("the checkpoint holds a CUDA RNG state but CUDA is not available; not restored")


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples; be robust to a loader that returns lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---- save / load -----------------------------------------------------------------------------
def save_checkpoint(
    directory: str | os.PathLike,
    *,
    stage: nn.Module,
    grid: Grid,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
    extra: dict | None = None,
) -> None:
    """Write a sharded checkpoint of the whole job to ``directory``. Collective: every rank calls it.

    Each rank writes its RNG states; dp-rank 0 of each stage also writes the stage's tensors
    (parameters and persistent buffers, keyed by their original names), the optimizer state and
    the scheduler state (under ZeRO-1 every DP rank writes its own optimizer-state shard). ``extra`` (JSON-serializable, e.g. ``{"global_step": 100}``) comes back
    from :func:`load_checkpoint`. The directory appears complete or not at all (see the module
    docstring); an existing checkpoint of the same name is replaced.
    """
    directory = Path(directory).absolute()
    extra_json = json.dumps(extra or {})  # fails on every rank alike, before any collective
    staging = _staging_path(directory)
    rank, coord = grid.rank, grid.coord
    _run_phase("creating the staging directory", lambda: _fresh_dir(staging) if rank == 0 else None)

    def write_shard() -> None:
        own = staging / rank_dir_name(coord)
        own.mkdir()
        if optimizer is not None and (coord.dp == 0 or is_sharded(optimizer)):
            _save_optimizer(optimizer, stage, own / OPTIMIZER_FILE)
        if coord.dp == 0:
            _save_stage(stage, own / WEIGHTS_FILE)
            if lr_scheduler is not None:
                torch.save(lr_scheduler.state_dict(), own / SCHEDULER_FILE)
        torch.save(_rng_state(), own / RNG_FILE)
        for entry in own.iterdir():
            _fsync(entry)

    try:
        _run_phase("writing checkpoint shards", write_shard)
        _run_phase("publishing the checkpoint", lambda: _publish_checkpoint(staging, directory, grid, extra_json)
                   if rank == 0 else None)
    except BaseException:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s (%s)", directory, grid.dims)


def _publish_checkpoint(staging: Path, directory: Path, grid: Grid, extra_json: str) -> None:
    """Rank 0, after every shard is written: describe the layout, then rename into place."""
    dims = grid.dims
    stages = []
    for pp in range(dims.pp):
        for tp in range(dims.tp):
            shard = rank_dir_name(Coord(pp=pp, dp=0, tp=tp))
            names, tied = _stage_file_names(staging / shard / WEIGHTS_FILE)
            stages.append({"stage_id": pp, "tp": tp, "dir": shard, "tensors": names, "tied": tied})
    first = staging / rank_dir_name(Coord(pp=0, dp=0, tp=0))
    layout = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dims": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp},
        "world_size": dims.world_size,
        "rank_dirs": {str(r): rank_dir_name(grid.layout.coord_of(r)) for r in range(dims.world_size)},
        "optimizer": (first / OPTIMIZER_FILE).exists(),
        "optimizer_sharded": dims.dp > 1 and (staging / rank_dir_name(Coord(pp=0, dp=1, tp=0)) / OPTIMIZER_FILE).exists(),
        "lr_scheduler": (first / SCHEDULER_FILE).exists(),
        "stages": stages,
        "torch_version": torch.__version__,
    }
    (staging / EXTRA_FILE).write_text(extra_json + "\n")
    _write_json(staging / LAYOUT_FILE, layout)  # last: its presence marks a complete checkpoint
    _publish_dir(staging, directory, _checkpoint_owned)


def _read_layout(directory: Path) -> dict[str, Any]:
    path = directory / LAYOUT_FILE
    if not path.exists():
        staging = _staging_path(directory)
        hint = f" (an interrupted save left {staging})" if staging.exists() else ""
        raise CheckpointError(f"{directory} is not a Merak checkpoint: {LAYOUT_FILE} is missing{hint}")
    layout = json.loads(path.read_text())
    if layout.get("format") != FORMAT or layout.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {layout.get('format')!r} version {layout.get('version')!r}, "
                              f"this Merak reads {FORMAT!r} version {FORMAT_VERSION}")
    return layout


def _check_layout(layout: Mapping[str, Any], grid: Grid, directory: Path) -> None:
    saved = layout["dims"]
    now = grid.dims
    if (saved["dp"], saved["tp"], saved["pp"]) != (now.dp, now.tp, now.pp):
        raise CheckpointError(
            f"checkpoint {directory} was saved with dp={saved['dp']} tp={saved['tp']} pp={saved['pp']} "
            f"({layout['world_size']} ranks) but this job runs {now} ({now.world_size} ranks). A Merak "
            f"checkpoint holds one shard per stage and one RNG state per rank, so it resumes only under "
            f"the layout that wrote it: relaunch with dp={saved['dp']} tp={saved['tp']} pp={saved['pp']}. "
            f"To change layout, resume under the old one and call export_pretrained, then start the new "
            f"job from the export with load_pretrained_weights (optimizer, scheduler and RNG start fresh)."
        )


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    stage: nn.Module,
    grid: Grid,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint` and return its ``extra`` dict.

    ``restore_rng=False`` restores weights only as far as randomness goes (loading the best
    model at the end of training must not rewind the random streams).

    Collective. Restores the stage's tensors (in place, so an optimizer built over the stage
    keeps working), the optimizer and scheduler when given, and this rank's RNG states last, so
    training continues with bitwise-identical results. Raises :class:`CheckpointError` (on every
    rank) for a checkpoint of another layout or partition, or a missing optimizer state.
    """
    directory = Path(directory).absolute()
    layout = _read_layout(directory)  # identical on every rank: errors here need no agreement
    _check_layout(layout, grid, directory)
    coord = grid.coord
    shard = directory / rank_dir_name(Coord(pp=coord.pp, dp=0, tp=coord.tp))

    def restore() -> dict:
        _load_stage(stage, shard / WEIGHTS_FILE)
        if optimizer is not None:
            dp_ranks = range(grid.dims.dp) if layout.get("optimizer_sharded") else [0]
            dp_ranks = sorted(dp_ranks, key=lambda dp: dp != coord.dp)  # this rank's own shard first
            _load_optimizer(optimizer, stage, [directory / rank_dir_name(Coord(pp=coord.pp, dp=dp, tp=coord.tp))
                                               / OPTIMIZER_FILE for dp in dp_ranks])
        if lr_scheduler is not None:
            if not (shard / SCHEDULER_FILE).exists():
                raise CheckpointError(f"{shard / SCHEDULER_FILE} is missing: the checkpoint was saved "
                                      "without a learning-rate scheduler; pass lr_scheduler=None")
            lr_scheduler.load_state_dict(torch.load(shard / SCHEDULER_FILE, weights_only=True))
        extra = json.loads((directory / EXTRA_FILE).read_text())
        if restore_rng:
            _set_rng_state(torch.load(directory / rank_dir_name(coord) / RNG_FILE, weights_only=True))
        return extra

    extra = _run_phase(f"loading checkpoint {directory}", restore)
    logger.info("loaded checkpoint %s (%s)", directory, grid.dims)
    return extra


# ---- export to Hugging Face format -----------------------------------------------------------
class _ModelSlots:
    """Where each named tensor of the user's model lives, with tied names grouped.

    Assigning a value to one name assigns it to every name of the same tensor, so ties survive
    the export whatever the model's own tying code does.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.aliases = _alias_groups(model)  # name -> all names of its tensor (first: canonical)
        self.filled: set[str] = set()  # canonical names

    def knows(self, name: str) -> bool:
        return name in self.aliases

    def wants(self, name: str) -> bool:
        return name in self.aliases and self.aliases[name][0] not in self.filled

    def assign(self, name: str, value: torch.Tensor) -> None:
        names = self.aliases[name]
        first_owner, first_attr = self._owner(names[0])
        current = getattr(first_owner, first_attr)
        if tuple(current.shape) != tuple(value.shape):
            raise CheckpointError(f"{name}: the stage holds shape {tuple(value.shape)}, "
                                  f"the model {tuple(current.shape)}")
        if current.device.type == "meta":
            # a copy: the exported model must not alias a live stage's parameters
            new: torch.Tensor = value.detach().to("cpu", copy=True)
            if isinstance(current, nn.Parameter):
                new = nn.Parameter(new, requires_grad=current.requires_grad)
            for path in names:
                owner, attr = self._owner(path)
                store = owner._parameters if attr in owner._parameters else owner._buffers
                store[attr] = new
        else:
            with torch.no_grad():
                current.copy_(value)  # a real model may share this tensor with a live stage
        self.filled.add(names[0])

    def _owner(self, path: str) -> tuple[nn.Module, str]:
        owner_path, _, attr = path.rpartition(".")
        return (self.model.get_submodule(owner_path) if owner_path else self.model), attr

    def still_meta(self) -> list[str]:
        state = self.model.state_dict()
        return sorted(name for name, t in state.items() if t.device.type == "meta")


def export_pretrained(directory: str | os.PathLike, *, stage: nn.Module, grid: Grid, model: nn.Module) -> None:
    """Consolidate every stage's weights into ``model`` and save it in Hugging Face format.

    Collective. ``model`` is the user's original model object (usually on the meta device: its
    tensors are then replaced, ties kept; real tensors are overwritten in place). dp-rank 0 of
    each stage streams its tensors to rank 0 one at a time, so rank 0 holds one copy of the model
    and no rank ever holds more than its stage plus one tensor in flight; a tied tensor is sent
    only by the first stage holding it. Rank 0 then calls ``model.save_pretrained(directory)``
    (safetensors, config and generation config), or writes ``model.safetensors`` for a plain
    ``nn.Module``. Everything is written to a staging directory first and then moved into
    ``directory`` file by file (each move atomic); other files there (a tokenizer, checkpoints)
    are kept.
    """
    if grid.dims.tp > 1:
        # Tensor-parallel shards are reassembled on tp-rank 0 of each stage (only the TP code
        # knows how fused blocks were split); from there on the export is the tp=1 one.
        from merak.runtime.tensor_parallel.export import FullStateView, gather_full_state_dict

        full = _run_phase("gathering tensor-parallel shards for export", lambda: gather_full_state_dict(stage))
        stage = FullStateView(stage, full)
    directory = Path(directory).absolute()
    coord, rank = grid.coord, grid.rank
    p2p = P2P(_comm_device(), _timeout_s())
    if rank == 0:
        _run_phase(f"exporting to {directory}", lambda: _gather_and_save(directory, stage, grid, model, p2p))
    elif coord.dp == 0 and coord.tp == 0:
        _run_phase(f"sending stage {coord.pp} for export", lambda: _send_stage(stage, p2p))
    else:
        _run_phase(f"exporting to {directory}", lambda: None)
    logger.info("exported %s", directory)


def _send_stage(stage: nn.Module, p2p: P2P) -> None:
    state = stage.state_dict()
    p2p.send(list(state), 0, "the stage's tensor names for export")
    p2p.wait_sends()
    wanted: list[str] = p2p.recv(0, "the tensor names rank 0 wants for export")
    for name in wanted:
        p2p.send({name: state[name]}, 0, f"{name} for export")
        p2p.wait_sends()  # one tensor in flight at a time


def _gather_and_save(directory: Path, stage: nn.Module, grid: Grid, model: nn.Module, p2p: P2P) -> None:
    slots = _ModelSlots(model)
    problems: list[str] = []

    def take(name: str, tensor: torch.Tensor) -> None:
        # Problems are collected, not raised, so that rank 0 still answers every sender.
        try:
            slots.assign(name, tensor)
        except CheckpointError as exc:
            problems.append(str(exc))

    own = stage.state_dict()
    problems += [f"{n}: no tensor of that name in the model" for n in own if not slots.knows(n)]
    for name, tensor in own.items():
        if slots.wants(name):
            take(name, tensor)
    for pp in range(1, grid.dims.pp):
        src = grid.layout.rank_of(pp, 0, 0)
        names: list[str] = p2p.recv(src, f"stage {pp}'s tensor names")
        problems += [f"{n}: no tensor of that name in the model" for n in names if not slots.knows(n)]
        wanted = [n for n in names if slots.wants(n)] if not problems else []
        p2p.send(wanted, src, "the tensor names wanted for export")
        p2p.wait_sends()
        for name in wanted:
            take(name, p2p.recv(src, f"{name} from stage {pp}")[name])
    if problems:
        raise CheckpointError(f"the stages do not fit the model passed to export_pretrained (pass the original "
                              f"model the stages were built from): {problems[:20]}")
    missing = slots.still_meta()
    if missing:
        raise CheckpointError(f"no stage holds {missing[:20]} (the model's forward never uses them), and they "
                              "are on the meta device; give them real values in the model before exporting")
    staging = directory / ".merak-export-staging"
    _fresh_dir(staging)
    try:
        if callable(getattr(model, "save_pretrained", None)):
            model.save_pretrained(staging)
        else:
            tensors, _ = _unique_tensors(model.state_dict())
            save_file(tensors, str(staging / HF_WEIGHTS_FILE), metadata={"format": "pt"})
        _publish_files(staging, directory, lambda name: bool(_HF_OWNED.match(name)))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---- import from Hugging Face format ---------------------------------------------------------
def _hf_weight_map(path: Path) -> tuple[Path, dict[str, str]]:
    """(directory, ``{tensor name: file name}``) of a save_pretrained directory or one safetensors file.

    Reads only the index or one header, never tensor data.
    """
    if path.is_file():
        files = [path.name]
        path = path.parent
    elif (path / HF_INDEX_FILE).exists():
        return path, dict(json.loads((path / HF_INDEX_FILE).read_text())["weight_map"])
    elif (path / HF_WEIGHTS_FILE).exists():
        files = [HF_WEIGHTS_FILE]
    else:
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else "it does not exist"
        raise CheckpointError(
            f"{path} has neither {HF_WEIGHTS_FILE} nor {HF_INDEX_FILE} (found: {present}). Merak reads "
            "safetensors only: re-save the model with save_pretrained (safetensors is its default)."
        )
    weight_map = {}
    for file in files:
        with safe_open(str(path / file), framework="pt", device="cpu") as f:
            weight_map.update({key: file for key in f.keys()})
    return path, weight_map


def _model_from_config(directory: Path) -> nn.Module | None:
    """The architecture named in ``directory``'s ``config.json``, built on the meta device (no
    memory, milliseconds), or ``None`` when there is no config or transformers lacks the class."""
    if not (directory / "config.json").exists():
        return None
    import transformers

    from merak.partitioner import init_empty_weights

    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as exc:  # an unknown model_type: no aliases to learn
        logger.debug("cannot read %s/config.json (%s); no alias lookup", directory, exc)
        return None
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    if cls is None:
        return None
    with init_empty_weights(include_buffers=True):
        return cls(config)


def _alias_groups(module: nn.Module) -> dict[str, list[str]]:
    """Every name of every tensor of ``module`` -> all names of that tensor."""
    groups: dict[int, list[str]] = collections.defaultdict(list)
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        groups[id(tensor)].append(name)
    return {name: names for names in groups.values() for name in names}


def _find_in_file(stage: nn.Module, weight_map: Mapping[str, str],
                  model: nn.Module | None) -> tuple[dict[str, str], list[str]]:
    """(``{stage key: file key}``, stage keys not found) for every state-dict key of ``stage``.

    A key is looked up under its own name, the canonical (tie) name of a tied parameter, other
    names of the same tensor in this stage and, when ``model`` is given, every name of the tensor
    in the full model.
    """
    canonical = {local: key for key, local in getattr(stage, "tied_parameters", {}).items()}
    local_aliases = _alias_groups(stage)
    model_aliases = _alias_groups(model) if model is not None else {}
    source: dict[str, str] = {}
    missing: list[str] = []
    for name in stage.state_dict():
        names = [name, canonical.get(name, name), *local_aliases.get(name, ())]
        names += [alias for known in names for alias in model_aliases.get(known, ())]
        found = next((n for n in names if n in weight_map), None)
        if found is None:
            missing.append(name)
        else:
            source[name] = found
    return source, missing


def load_pretrained_weights(
    stage: nn.Module, path: str | os.PathLike, *, model: nn.Module | None = None
) -> list[str]:
    """Fill ``stage`` from a ``save_pretrained`` directory (or one ``.safetensors`` file).

    Opens only the files holding this stage's tensors and reads only its keys (``safe_open`` +
    ``get_tensor``), so a stage of a 20B model reads its own share of the checkpoint. A tied
    tensor is found under whichever of its names the file has (the last stage's ``lm_head.weight``
    is read from ``transformer.wte.weight`` when the file, as HF writes it, has only that). Ties
    this stage cannot see (BERT's ``cls.predictions.decoder.bias`` is ``cls.predictions.bias``)
    come from ``model`` when given, else from the architecture in the directory's
    ``config.json`` (built on the meta device, only when a key is not found). Values are copied in
    place (cast to the stage's dtype). Returns the file keys read. Raises
    :class:`CheckpointError` listing the stage tensors the files lack, or a shape mismatch.
    """
    directory, weight_map = _hf_weight_map(Path(path))
    state = stage.state_dict(keep_vars=True)
    source, missing = _find_in_file(stage, weight_map, model)
    if missing and model is None:
        # Ties inside the model that this stage cannot see (BERT's decoder bias is the head's
        # bias; HF stores one name): learn them from the architecture the config names.
        model = _model_from_config(directory)
        if model is not None:
            source, missing = _find_in_file(stage, weight_map, model)
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensor(s) of stage {getattr(stage, 'stage_id', '?')}: {missing[:30]}"
            f"{' ...' if len(missing) > 30 else ''}. Is it a checkpoint of this model (same architecture "
            "and config)?"
        )
    by_file: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for name, key in source.items():
        by_file[weight_map[key]][key].append(name)
    loaded: list[str] = []
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(str(directory / file), framework="pt", device="cpu") as f:
                for key, names in keys.items():
                    value = f.get_tensor(key)
                    for name in names:
                        if tuple(state[name].shape) != tuple(value.shape):
                            raise CheckpointError(f"{directory / file}: {key} has shape {tuple(value.shape)}, "
                                                  f"the stage's {name} {tuple(state[name].shape)}")
                        state[name].copy_(value)
                    loaded.append(key)
    logger.info("stage %s: loaded %d tensors from %s", getattr(stage, "stage_id", "?"), len(loaded), path)
    return loaded
