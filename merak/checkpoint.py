"""Checkpoints of a pipeline-parallel job: resume under any layout, HF export, HF import.

Three jobs, three formats:

* **Resume** (:func:`save_checkpoint` / :func:`load_checkpoint`) goes through
  ``torch.distributed.checkpoint`` (DCP). Every rank hands DCP what it holds - its stage's
  tensors, its optimizer states, the scheduler, its RNG states - as one flat state dict keyed by
  the *original model's* names (:mod:`merak.train_state` has the key grammar and why), and DCP
  writes every rank's part in parallel, storing each key once (data-parallel replicas and the
  two copies of a tied weight are de-duplicated). Nothing is gathered: a save costs no more
  memory than training. Because keys are model names, a later job of *another* layout (dp, tp,
  pp, cut, virtual stages, ZeRO-1 on or off) loads it: each rank asks for the names it holds.
* **Export** (:func:`export_pretrained`) writes the Hugging Face format, each stage its own
  safetensors shard in parallel plus one index (:mod:`merak.hf_export`), which any layout (or
  plain ``from_pretrained``) can read.
* **Import** (:func:`load_pretrained_weights`) fills one stage from a ``save_pretrained``
  directory, opening only the files and keys the stage owns.

Layout of a checkpoint directory::

    layout.json     format, grid dims, tensor-parallel shard specs (written last, by rank 0)
    extra.json      the caller's JSON state (global step, cut points, loss scale ...)
    dcp/            DCP's files: .metadata and one __<rank>_0.distcp per writing rank

Decisions worth knowing:

* **Atomic saves.** DCP writes into a staging directory beside the target; after every rank's
  part is written (DCP's own completion step), rank 0 writes ``layout.json`` and renames the
  staging directory onto the target. DCP alone is not atomic (it writes in place, its metadata
  last), so a crash mid-save - a rank SIGKILLed - leaves only the staging directory: an older
  checkpoint of the same name stays loadable, and :func:`is_complete` tells complete checkpoints
  apart (the trainer's ``resume_from_checkpoint=True`` picks the last complete one). Files that
  other code (the trainer's ``trainer_state.json``) put in the target directory are kept. The
  staging directory must be on a file system every rank sees (as for any multi-node job). An
  export goes through a staging directory too, but is moved into place file by file: its target
  is usually the training output directory, which holds checkpoints and logs and so must not be
  renamed as a whole.
* **Failures are collective.** A rank that fails to write or read still joins a final
  agreement step (DCP's own, or an all-reduce of failure flags through
  :mod:`merak.runtime.distributed.collectives`),
  so every rank raises (naming the failing ranks) instead of the healthy ones hanging in the
  next collective.
* **Hung peers end every wait within ``MERAK_TIMEOUT_S``.** DCP's collectives run on a gloo
  group of their own whose timeout is ``MERAK_TIMEOUT_S`` (:func:`_dcp_group`), and their errors
  are re-raised as :class:`CheckpointTimeoutError` naming this rank, the checkpoint, its step and
  the DCP phase it waited in (:func:`_call_dcp`, :func:`_while`).
* **What crosses a layout change:** weights, optimizer states (matched by parameter name,
  including ZeRO-1 shards and tensor-parallel shards, re-cut with the TP code's ``ShardSpec``),
  hyper-parameters as the scheduler left them, the scheduler, and the caller's ``extra`` (step,
  data position). Random streams (default and tensor-parallel) come back where the rank's
  coordinates still mean the same: all of them under the same layout, some under another
  (:mod:`merak.rng_streams` has the rule).
* A checkpoint of another *model* (missing or extra tensor names) raises
  :class:`CheckpointError` listing them.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import datetime
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

from merak.runtime.distributed import collectives, groups
from merak.runtime.distributed.objects import all_gather_objects
from merak.runtime.distributed.p2p import P2PTimeoutError
from merak.runtime.distributed.grid import Grid
from merak.rng_streams import capture as capture_rng, coord_name, restore as restore_rng_streams, restore_sources
from merak.dcp_reader import CONTIGUOUS_ITEMS, DirectReader
from merak.hf_export import hf_names, shard_file_name, stage_export_tensors, write_index, write_shard
from merak.runtime.memory.zero import local_optimizer
from merak.train_state import (HPARAMS, LR_SCHEDULER, MODEL, OPTIM, StageTensor, StateRequests, collect_state,
                               leaf_name, rng_key, spec_from_json, spec_to_json, stage_tensors, tensor_key)

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "CheckpointTimeoutError",
    "save_checkpoint",
    "load_checkpoint",
    "PendingSave",
    "is_complete",
    "last_complete_checkpoint",
    "rotate_checkpoints",
    "export_pretrained",
    "load_pretrained_weights",
]

FORMAT = "merak-checkpoint"
FORMAT_VERSION = 2  # 1: per-rank safetensors/torch files, one layout only
LAYOUT_FILE = "layout.json"
EXTRA_FILE = "extra.json"
DCP_DIR = "dcp"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
# What a Hugging Face export owns in its directory; anything else there (a tokenizer) is kept.
_HF_OWNED = re.compile(r"^(model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?|"
                       r"config\.json|generation_config\.json)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or applied; the message says why and what to do."""


class CheckpointTimeoutError(CheckpointError):
    """A rank waited longer than ``MERAK_TIMEOUT_S`` for the others during a save or load (a peer
    hung, was stopped or died); the message names this rank, the checkpoint, its step and what
    it waited for."""


# ---- collectives -----------------------------------------------------------------------------
_TIMEOUT: contextvars.ContextVar[float | None] = contextvars.ContextVar("merak_checkpoint_timeout", default=None)


def _timeout_s() -> float:
    """The limit of every wait inside the current save or load: its ``timeout_s`` argument (the
    trainer passes ``p2p_timeout``), else ``MERAK_TIMEOUT_S``."""
    value = _TIMEOUT.get()
    return groups.default_timeout_s() if value is None else float(value)


@contextlib.contextmanager
def _limit(timeout_s: float | None) -> Iterator[None]:
    token = _TIMEOUT.set(timeout_s)
    try:
        yield
    finally:
        _TIMEOUT.reset(token)


def _distributed() -> bool:
    return groups.is_active()


def _agree(error: BaseException | None, what: str) -> None:
    """Collective: every rank learns which ranks failed ``what``; all raise if any did.

    Also serves as the barrier that ends each phase, so a failing rank never leaves its peers
    waiting in a later collective. A rank that timed out waiting for its peers raises at once:
    they hang (or time out in their own waits), and agreeing would wait for them a second time.
    """
    if isinstance(error, CheckpointTimeoutError):
        raise error  # a peer hangs: agreeing would only wait for it once more
    ranks = [0] if error is not None else []
    if groups.is_active():
        flags = torch.zeros(groups.size(), dtype=torch.int32)
        flags[groups.rank()] = int(error is not None)
        collectives.all_reduce(flags, f"the other ranks to finish {what}", timeout_s=_timeout_s())
        ranks = [r for r, bad in enumerate(flags.tolist()) if bad]
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


_DCP_GROUPS: dict[tuple[Any, str, float], Any] = {}


def _dcp_group(purpose: str) -> Any:
    """A gloo group of all ranks, with ``MERAK_TIMEOUT_S`` as its timeout, for DCP's collectives.

    Why a group of its own: DCP's planning and agreement steps are object collectives that wait
    as long as their group's timeout, which for the default group is whatever the launcher chose
    (torch's 30 minutes, or NCCL's); on this group a hung peer ends every rank's wait within the
    limit, on the host (gloo) even in a GPU job. ``purpose`` keeps the foreground (save, load)
    and the background (``async_save``'s thread) apart: DCP's advice is that a background save
    must not share a communicator with anything running meanwhile. Created collectively by the
    first save or load (every rank calls those), again for a new job or another timeout.
    """
    key = (dist.group.WORLD, purpose, _timeout_s())
    if key not in _DCP_GROUPS:
        _DCP_GROUPS[key] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_timeout_s()))
    return _DCP_GROUPS[key]


def _step_text(extra: Mapping[str, Any] | None) -> str:
    step = (extra or {}).get("global_step")
    return f" (step {step})" if step is not None else ""


def _call_dcp(call: Callable[[], Any], phase: str, context: str) -> Any:
    """Run a DCP save or load (or wait for a background one); turn its failures into errors that
    name this rank, ``context`` (which checkpoint, which step) and ``phase`` (what it waited for).

    DCP's own errors name no rank: a gloo timeout reads "Timed out waiting 3000ms for send
    operation to complete". A rank that fails itself (a full disk) is reported by DCP on every
    rank with the failing ranks (its ``CheckpointException``); that text is kept.
    """
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        text, me, limit = str(exc).strip(), groups.rank(), _timeout_s()
        if "imed out" in text or "timeout" in text.lower() or isinstance(exc, TimeoutError):
            raise CheckpointTimeoutError(
                f"rank {me} timed out after waiting up to {limit:.0f}s (the checkpoint's timeout_s, default "
                f"MERAK_TIMEOUT_S) for the other ranks in "
                f"torch.distributed.checkpoint's {phase}, while {context}. A peer hung, was stopped or died: "
                f"the ranks that do not report this error are the suspects (check their logs). "
                f"[DCP said: {text[:200] or type(exc).__name__}]") from exc
        raise CheckpointError(f"rank {me}: {phase} failed while {context}: {text}") from exc


@contextlib.contextmanager
def _while(context: str) -> Any:
    """Add ``context`` (which checkpoint, which step) to a bounded wait's error raised inside:
    Merak's own collectives already name this rank and what it waited for."""
    try:
        yield
    except P2PTimeoutError as exc:
        raise CheckpointTimeoutError(f"{exc} (while {context})") from exc


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
    return name in (LAYOUT_FILE, EXTRA_FILE, DCP_DIR)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")



# ---- tensors -----------------------------------------------------------------------------------
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



def _mismatch(what: str, expected: Iterable[str], found: Iterable[str]) -> str:
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    return f"{what}: missing {missing[:20]}{' ...' if len(missing) > 20 else ''}, " \
           f"unexpected {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"


# ---- fault injection -------------------------------------------------------------------------
def _fault_point(where: str) -> None:
    """Test hook: ``MERAK_CHECKPOINT_FAULT=<rank>:<where>[:<n>[:stop]]`` SIGKILLs (or, with
    ``stop``, SIGSTOPs: a hung peer whose sockets stay open) that rank the ``n``-th time (default
    1st) it reaches ``where``: ``written`` (its DCP part of a save is on disk, the checkpoint not
    yet complete) or ``read`` (its DCP reads of a load are done, the load not yet agreed). Lets a
    test prove that a crash mid-save leaves the previous checkpoint, and that a hung peer ends the
    others' wait within the timeout."""
    spec = os.environ.get("MERAK_CHECKPOINT_FAULT")
    if not spec:
        return
    rank, point, *rest = spec.split(":")
    if point != where or int(rank) != groups.rank():
        return
    _FAULT_HITS[where] = _FAULT_HITS.get(where, 0) + 1
    if _FAULT_HITS[where] == int(rest[0] if rest else 1):
        action = rest[1] if len(rest) > 1 else "kill"
        logger.error("MERAK_CHECKPOINT_FAULT: %s rank %s at %s", "stopping" if action == "stop" else "killing",
                     rank, where)
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


_FAULT_HITS: dict[str, int] = {}


class _Writer(FileSystemWriter):
    """DCP's file writer with the ``written`` fault point after this rank's data is on disk."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = super().write_data(plan, planner)
        future.wait()
        _fault_point("written")
        return future


class _Reader(DirectReader):
    """Merak's DCP file reader (:mod:`merak.dcp_reader`) with the ``read`` fault point after this
    rank's reads are done."""

    def read_data(self, plan: Any, planner: Any) -> Any:
        future = super().read_data(plan, planner)
        future.wait()
        _fault_point("read")
        return future


# ---- save ------------------------------------------------------------------------------------
class PendingSave:
    """A checkpoint being written in the background (``save_checkpoint(..., async_save=True)``).

    :meth:`wait` is collective: every rank waits for its own part, the ranks agree that all
    parts are written, and rank 0 publishes the checkpoint (until then it is not
    :func:`is_complete`, so a crash before ``wait`` leaves the previous checkpoint the last one).
    """

    def __init__(self, future: Any, directory: Path, publish: Callable[[], None], cleanup: Callable[[], None],
                 context: str, timeout_s: float) -> None:
        self.directory = directory
        self._future, self._publish, self._cleanup, self._context = future, publish, cleanup, context
        self._timeout_s = timeout_s  # the save's limit, for the waits of wait()
        self._done = False

    def done(self) -> bool:
        """Whether :meth:`wait` has returned or raised (the checkpoint is published or abandoned)."""
        return self._done

    def wait(self) -> None:
        if self._done:
            return
        try:
            with _limit(self._timeout_s), _while(self._context):
                # The background thread's own collectives end within the limit (its group's
                # timeout); twice that bounds this wait even if the thread started late.
                _run_phase(f"writing checkpoint {self.directory} in the background", lambda: _call_dcp(
                    lambda: self._future.result(timeout=2 * _timeout_s()), "background save", self._context))
                _run_phase("publishing the checkpoint", self._publish)
        except BaseException:
            self._cleanup()
            raise
        finally:
            self._done = True
        logger.info("saved checkpoint %s (in the background)", self.directory)


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    stage: nn.Module,
    grid: Grid,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
    extra: dict | None = None,
    async_save: bool = False,
    timeout_s: float | None = None,
) -> PendingSave | None:
    """Write a checkpoint of the whole job to ``directory``. Collective: every rank calls it.

    Every rank hands DCP its stage's tensors (keyed by the original model's names), its optimizer
    states (its ZeRO-1 shard's, if sharded), the scheduler and its RNG states; DCP writes each
    rank's part in parallel, each tensor once (replicas de-duplicated). ``extra``
    (JSON-serializable, e.g. ``{"global_step": 100}``) comes back from :func:`load_checkpoint`.
    The directory appears complete or not at all (see the module docstring); an existing
    checkpoint of the same name is replaced.

    ``async_save=True``: the state is copied to host memory (``dcp.async_save``'s staging) and
    written by a background thread while training goes on; returns a :class:`PendingSave`
    whose ``wait()`` (collective) must be called before the next save and at the end.

    ``timeout_s`` bounds every wait of the save, DCP's collectives included (default
    ``MERAK_TIMEOUT_S``); a peer that hangs ends it with :class:`CheckpointTimeoutError`.
    """
    with _limit(timeout_s):
        directory = Path(directory).absolute()
        extra_json = json.dumps(extra or {})  # fails on every rank alike, before any collective
        context = f"saving checkpoint {directory}{_step_text(extra)}"
        staging = _staging_path(directory)
        rank, coord = grid.rank, grid.coord
        tp_rank = _tp_rank(stage)

        def collect() -> dict[str, Any]:
            return collect_state(stage, tp_rank, optimizer, lr_scheduler, (coord_name(coord), capture_rng(stage)))

        def cleanup() -> None:
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)

        with _while(context):
            _run_phase("creating the staging directory", lambda: _fresh_dir(staging) if rank == 0 else None)
            try:
                state = _run_phase("collecting the training state", collect)
                specs = {item.name: spec_to_json(item.spec) for item in stage_tensors(stage) if item.spec is not None}
                all_specs = all_gather_objects(specs, _timeout_s(), "tensor-parallel shard specs")
                layout = _layout(grid, {k: v for ranks in all_specs for k, v in ranks.items()},
                                 optimizer is not None, lr_scheduler is not None)

                def publish() -> None:
                    if rank == 0:
                        _publish_checkpoint(staging, directory, layout, extra_json)

                writer = _Writer(staging / DCP_DIR, sync_files=True)
                planner = DefaultSavePlanner(flatten_state_dict=False)
                distributed = _distributed()
                if async_save:
                    group = _dcp_group("background") if distributed else None
                    future = _call_dcp(lambda: dcp.async_save(state, storage_writer=writer, planner=planner,
                                                              no_dist=not distributed, process_group=group),
                                       "asynchronous save (staging)", context)
                    return PendingSave(future, directory, publish, cleanup, context, _timeout_s())
                group = _dcp_group("foreground") if distributed else None
                _call_dcp(lambda: dcp.save(state, storage_writer=writer, planner=planner, no_dist=not distributed,
                                           process_group=group), "save (plan, write, agree)", context)
                _run_phase("publishing the checkpoint", publish)
            except BaseException:
                cleanup()
                raise
        logger.info("saved checkpoint %s (%s)", directory, grid.dims)
        return None


def _tp_rank(stage: nn.Module) -> int:
    tpg = getattr(stage, "tp_group", None)
    return int(tpg.rank) if tpg is not None else 0


def _layout(grid: Grid, specs: dict[str, Any], optimizer: bool, lr_scheduler: bool) -> dict[str, Any]:
    dims = grid.dims
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dims": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp},
        "world_size": dims.world_size,
        "tp_specs": specs,
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "torch_version": torch.__version__,
        CONTIGUOUS_ITEMS: True,  # collect_state hands DCP contiguous tensors only
    }


def _publish_checkpoint(staging: Path, directory: Path, layout: dict[str, Any], extra_json: str) -> None:
    """Rank 0, after every rank's part is written: describe the layout, then rename into place."""
    (staging / EXTRA_FILE).write_text(extra_json + "\n")
    _write_json(staging / LAYOUT_FILE, layout)  # last: its presence marks a complete checkpoint
    _fsync(staging / DCP_DIR)
    _publish_dir(staging, directory, _checkpoint_owned)


# ---- load ------------------------------------------------------------------------------------
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


def is_complete(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a complete, published checkpoint (its ``layout.json`` is
    written last, after every rank's part)."""
    try:
        _read_layout(Path(directory))
        return True
    except (CheckpointError, OSError, ValueError):
        return False


def last_complete_checkpoint(output_dir: str | os.PathLike, also: Iterable[str] = ()) -> str | None:
    """The ``checkpoint-<step>`` directory of ``output_dir`` with the highest step that is
    complete (:func:`is_complete`, plus the files ``also`` names, e.g. the trainer's
    ``trainer_state.json``, written after Merak's part); ``None`` if there is none. A save that
    crashed leaves a staging directory or a directory without ``layout.json``: both are skipped.
    """
    found: list[tuple[int, Path]] = []
    root = Path(output_dir)
    if not root.is_dir():
        return None
    for entry in root.iterdir():
        match = _CHECKPOINT_DIR.match(entry.name)
        if match and entry.is_dir() and is_complete(entry) and all((entry / f).exists() for f in also):
            found.append((int(match.group(1)), entry))
    return str(max(found)[1]) if found else None


_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def rotate_checkpoints(output_dir: str | os.PathLike, save_total_limit: int | None, *,
                       best_model_checkpoint: str | None = None, in_flight: Iterable[str | os.PathLike] = (),
                       also: Iterable[str] = ()) -> list[str]:
    """HF's ``save_total_limit`` rotation (``transformers.trainer_utils.rotate_checkpoints``:
    oldest first by modification time, the newest and the best kept), made safe for checkpoints
    written in the background; returns the directories deleted.

    Besides HF's newest and best it never deletes a checkpoint in ``in_flight`` (being written:
    its directory may hold only the trainer's files, so HF would count it as the newest) nor the
    last complete checkpoint (:func:`last_complete_checkpoint` with ``also``), the one a crash
    would resume from. So with ``save_total_limit=1`` and a save in flight, two checkpoints
    stay on disk until the new one is complete.
    """
    from transformers.trainer_utils import sort_checkpoints

    if save_total_limit is None or save_total_limit <= 0:
        return []
    checkpoints = sort_checkpoints(str(output_dir), use_mtime=True)
    if len(checkpoints) <= save_total_limit:
        return []
    protected = {checkpoints[-1], *(str(Path(p)) for p in in_flight)}
    for keep in (best_model_checkpoint, last_complete_checkpoint(output_dir, also)):
        if keep is not None:
            protected.add(str(Path(keep)))
    remaining, deleted = len(checkpoints), []
    for checkpoint in checkpoints:
        if remaining <= max(save_total_limit, len(protected & set(checkpoints))):
            break
        if checkpoint not in protected:
            shutil.rmtree(checkpoint, ignore_errors=True)
            deleted.append(checkpoint)
            remaining -= 1
    return deleted


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    stage: nn.Module,
    grid: Grid,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
    restore_rng: bool = True,
    timeout_s: float | None = None,
) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint` and return its ``extra`` dict.

    Any layout may load it: each rank asks for the tensors its stage holds, by name (another
    cut, pp, dp, tp, ZeRO-1 or not, virtual stages); see the module docstring. Random streams
    (default and tensor-parallel) come back whole under the layout that saved them, and under
    another layout where the rank's coordinates still exist (:mod:`merak.rng_streams` has the
    rule); other ranks keep their current streams. ``restore_rng=False`` skips them (loading the
    best model at the end of training must not rewind the random streams).

    Collective. Restores the stage's tensors (in place, so an optimizer built over the stage
    keeps working), the optimizer and scheduler when given, and the RNG states last. Raises
    :class:`CheckpointError` (on every rank) for a checkpoint of another model or a missing
    optimizer state; ``timeout_s`` bounds every wait (default ``MERAK_TIMEOUT_S``), a peer
    that hangs ends the load with :class:`CheckpointTimeoutError`.
    """
    with _limit(timeout_s):
        directory = Path(directory).absolute()
        layout = _read_layout(directory)  # identical on every rank: errors here need no agreement
        if optimizer is not None and not layout.get("optimizer"):
            raise CheckpointError(f"{directory} was saved without optimizer state; load it with optimizer=None "
                                  "(weights only) or from a checkpoint that has it")
        if lr_scheduler is not None and not layout.get("lr_scheduler"):
            raise CheckpointError(f"{directory} was saved without a learning-rate scheduler; pass lr_scheduler=None")
        saved_dims = layout["dims"]
        rng_sources = restore_sources(saved_dims, grid.dims, grid.coord) if restore_rng else (None, None)
        items = stage_tensors(stage)

        def plan() -> tuple[StateRequests, list[Callable[[], None]]]:
            metadata = FileSystemReader(str(directory / DCP_DIR)).read_metadata().state_dict_metadata
            specs = {name: spec_from_json(value) for name, value in layout.get("tp_specs", {}).items()}
            requests = StateRequests(metadata, specs, _tp_rank(stage))
            return requests, _plan_restore(requests, items, stage, optimizer, lr_scheduler, rng_sources)

        extra = json.loads((directory / EXTRA_FILE).read_text())
        context = f"loading checkpoint {directory}{_step_text(extra)}"
        with _while(context):
            requests, appliers = _run_phase(f"planning the load of {directory}", plan)
            _check_model_names(requests.names(MODEL), {item.name for item in items}, directory)
            distributed = _distributed()
            group = _dcp_group("foreground") if distributed else None
            reader = _Reader(str(directory / DCP_DIR), contiguous=bool(layout.get(CONTIGUOUS_ITEMS)))
            _call_dcp(lambda: dcp.load(requests.buffers, storage_reader=reader,
                                       planner=DefaultLoadPlanner(flatten_state_dict=False,
                                                                  flatten_sharded_tensors=False),
                                       no_dist=not distributed, process_group=group),
                      "load (plan, read, agree)", context)
            _run_phase(f"loading checkpoint {directory}", lambda: [apply() for apply in appliers])
        if restore_rng and rng_sources != (coord_name(grid.coord),) * 2:
            logger.info("checkpoint %s was saved with %s, this job runs %s: default random streams continue from "
                        "%s, tensor-parallel ones from %s (None: this rank keeps its own)", directory, saved_dims,
                        grid.dims, *rng_sources)
        logger.info("loaded checkpoint %s (%s)", directory, grid.dims)
        return extra


def _check_model_names(saved: set[str], own: set[str], directory: Path) -> None:
    """Collective: the stages of this job together hold exactly the checkpoint's tensors."""
    held = set().union(*all_gather_objects(sorted(own), _timeout_s(), "the stages' tensor names"))
    if held != saved:
        raise CheckpointError(
            _mismatch(f"{directory} holds the tensors of another model", held, saved)
            + ". Resume with the model (architecture and config) that wrote it."
        )


def _plan_restore(requests: StateRequests, items: list[StageTensor], stage: nn.Module,
                  optimizer: torch.optim.Optimizer | None, lr_scheduler: Any | None,
                  rng_sources: tuple[str | None, str | None]) -> list[Callable[[], None]]:
    """Register this rank's DCP requests; return what to run, in order, once they are filled.
    ``rng_sources``: the saved ranks whose default and TP random streams this rank continues
    (:func:`merak.rng_streams.restore_sources`)."""
    appliers: list[Callable[[], None]] = []
    for item in items:
        if not requests.has(MODEL, item.name):
            continue  # reported collectively by _check_model_names
        value = requests.want_tensor(MODEL, item)
        appliers.append(lambda item=item, value=value: _copy_into(item, value()))
    if optimizer is not None:
        appliers.append(_plan_optimizer(requests, items, optimizer))
    if lr_scheduler is not None:
        state = requests.want_object(LR_SCHEDULER)
        appliers.append(lambda: lr_scheduler.load_state_dict(state()))
    wanted = {key: requests.want_object(rng_key(key)) for key in dict.fromkeys(rng_sources)
              if key is not None and rng_key(key) in requests.metadata}
    if wanted:
        default, tp = rng_sources

        def apply_rng() -> None:
            values = {key: value() for key, value in wanted.items()}
            for warning in restore_rng_streams(values.get(default), values.get(tp), stage):
                logger.warning(warning)

        appliers.append(apply_rng)
    return appliers


def _tensor_or_none(value: Any) -> torch.Tensor | None:
    return value if isinstance(value, torch.Tensor) else None


def _copy_into(item: StageTensor, value: torch.Tensor) -> None:
    if tuple(value.shape) != tuple(item.tensor.shape):
        raise CheckpointError(f"{item.name}: the checkpoint holds shape {tuple(value.shape)} for this rank, "
                              f"the stage {tuple(item.tensor.shape)} (another model config?)")
    with torch.no_grad():
        item.tensor.copy_(value)  # in place: optimizers keep their Parameters


def _plan_optimizer(requests: StateRequests, items: list[StageTensor],
                    optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """Requests for the states of the parameters this rank's optimizer holds (its ZeRO-1 shard's,
    whatever shard saved them) and each group's hyper-parameters; returns the applier."""
    by_id = {id(item.tensor): item for item in items}
    local = local_optimizer(optimizer)
    states: dict[int, dict[str, Callable[[], Any]]] = {}
    flat = [p for group in local.param_groups for p in group["params"]]
    for index, p in enumerate(flat):
        item = by_id[id(p)]
        leaves = requests.leaves(OPTIM, item.name)
        current = local.state.get(p, {})  # read in place where it fits (load_state_dict keeps the tensors)
        if leaves:
            states[index] = {leaf_name(leaf): requests.want_tensor(OPTIM, item, leaf, _tensor_or_none(
                current.get(leaf_name(leaf)))) for leaf in leaves}
    # (optimizer, group index, saved hyper-parameters): groups are found again after the load,
    # since load_state_dict replaces the group dicts. The ZeRO-1 wrapper's groups hold what the
    # scheduler set since the shard's last step.
    hyper: list[tuple[torch.optim.Optimizer, int, Callable[[], Any]]] = []
    for opt in {id(o): o for o in (optimizer, local)}.values():
        for i, group in enumerate(opt.param_groups):
            if group["params"]:
                name = by_id[id(group["params"][0])].name
                key = tensor_key(HPARAMS, name)
                if key not in requests.metadata:
                    raise CheckpointError(f"the checkpoint has no optimizer hyper-parameters for {name}")
                hyper.append((opt, i, requests.want_object(key)))

    def apply() -> None:
        positions = iter(range(len(flat)))
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [next(positions) for _ in group["params"]]}
                  for group in local.param_groups]
        local.load_state_dict({"state": {i: {leaf: value() for leaf, value in leaves.items()}
                                         for i, leaves in states.items()}, "param_groups": groups})
        for opt, i, values in hyper:
            opt.param_groups[i].update(values())

    return apply


# ---- export to Hugging Face format -----------------------------------------------------------
def export_pretrained(directory: str | os.PathLike, *, stage: nn.Module, grid: Grid, model: nn.Module) -> None:
    """Write the trained model in Hugging Face format, every stage its own shard, in parallel.

    Collective. ``model`` is the user's original model object (usually on the meta device): it
    gives the names HF expects (:func:`merak.hf_export.hf_names`), the config and the generation
    config. Each stage's first rank writes ``model-0000k-of-0000n.safetensors`` (after gathering
    its TP shards inside its TP group), rank 0 the index, ``config.json`` and
    ``generation_config.json`` (see :mod:`merak.hf_export`); no rank holds more than its stage.
    Tensors of ``model`` no stage holds (its forward never uses them) are written by rank 0 from
    ``model`` when real, and refused when on the meta device. Everything is written to a staging
    directory first and then moved into ``directory`` file by file (each move atomic); other
    files there (a tokenizer, checkpoints) are kept.
    """
    directory = Path(directory).absolute()
    coord, rank = grid.coord, grid.rank
    if grid.dims.tp > 1:
        from merak.runtime.tensor_parallel.export import gather_full_state_dict

        state = _run_phase("gathering tensor-parallel shards for export", lambda: gather_full_state_dict(stage))
    else:
        state = stage.state_dict()
    writer = coord.dp == 0 and coord.tp == 0
    names = hf_names(model)
    tensors, unknown = stage_export_tensors(state, names) if writer else ({}, [])
    mine = (coord.pp, {n: t.numel() * t.element_size() for n, t in tensors.items()}, unknown) if writer else None
    held = sorted((h for h in all_gather_objects(mine, _timeout_s(), "the stages' tensor names for export")
                   if h is not None), key=lambda h: h[0])
    problems = [name for _, _, names_unknown in held for name in names_unknown]
    if problems:  # identical on every rank: no agreement needed
        raise CheckpointError(f"the stages do not fit the model passed to export_pretrained (pass the original "
                              f"model the stages were built from): no tensor {problems[:20]} in the model")
    owner: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for pp, stage_sizes, _ in held:
        for name, size in stage_sizes.items():
            if name not in owner:
                owner[name], sizes[name] = pp, size
    model_state = model.state_dict()
    unheld = sorted({names[k] for k in model_state} - set(owner))
    meta = [n for n in unheld if model_state[n].device.type == "meta"]
    if meta:
        raise CheckpointError(f"no stage holds {meta[:20]} (the model's forward never uses them), and they "
                              "are on the meta device; give them real values in the model before exporting")
    writers = [pp for pp, _, _ in held]
    first = writers[0]
    for name in unheld:
        owner[name], sizes[name] = first, model_state[name].numel() * model_state[name].element_size()
    files = {pp: shard_file_name(i, len(writers)) for i, pp in enumerate(writers)}
    own = {n: t for n, t in tensors.items() if owner[n] == coord.pp}
    if writer and coord.pp == first:
        own.update({n: model_state[n] for n in unheld})
    staging = directory / ".merak-export-staging"
    _run_phase("creating the export staging directory", lambda: _fresh_dir(staging) if rank == 0 else None)
    try:
        _run_phase(f"writing export shards to {staging}",
                   lambda: write_shard(staging / files[coord.pp], own, _unique_tensors) if writer else None)

        def finish() -> None:
            if len(writers) > 1:
                write_index(staging / HF_INDEX_FILE, {n: files[pp] for n, pp in owner.items()}, sum(sizes.values()))
            _save_configs(model, staging)
            _publish_files(staging, directory, lambda name: bool(_HF_OWNED.match(name)))

        _run_phase(f"exporting to {directory}", lambda: finish() if rank == 0 else None)
    except BaseException:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %s (%d shard(s))", directory, len(writers))


def _save_configs(model: nn.Module, directory: Path) -> None:
    """What ``save_pretrained`` writes beside the weights: ``config.json`` (naming the model's
    class, as HF does) and, for a model that generates, ``generation_config.json``."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "save_pretrained", None)):
        return
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if generation is not None and can_generate():
        generation.save_pretrained(directory)


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
