"""A rank's random streams in a checkpoint, and which saved stream a rank of another layout continues.

Each rank draws from two kinds of streams:

* the **default streams** (python ``random``, numpy, torch's CPU generator and, with CUDA, the
  device's): data-side code and every dropout of a *replicated* region draw from them. All
  tensor-parallel ranks of one (pipeline stage, data-parallel replica) hold equal default
  streams - they are seeded alike and draw alike - and must keep them equal, or a replicated
  dropout would drop different elements of the copies of one activation;
* the **tensor-parallel stream** (:class:`~merak.runtime.tensor_parallel.random.TPRNGTracker`,
  ``stage.tp_rng``, seeded ``seed + TP_SEED_OFFSET + tp rank``): dropouts of *sharded* regions
  draw from it, so the shards of one activation get different masks.

What a resume restores (:func:`restore_sources`):

* **same layout** (dp, tp, pp unchanged): every rank its own default and TP streams, so the
  resumed run draws exactly the masks the uninterrupted run would have (bitwise resume with
  dropout on);
* **another layout**: a stream is restored only where the coordinates that give it its meaning
  still exist. The default streams of (stage ``pp``, replica ``dp``) come from the saved rank
  (``pp``, ``dp``, tp 0) when the job has the same number of pipeline stages (stage ``pp`` then
  runs the same part of the model - the trainer keeps the saved cut at an equal stage count)
  and the saved job had replica ``dp``; every TP rank of the group takes that same stream, so
  they stay equal whatever ``tp`` was. The TP stream of (``pp``, ``dp``, ``tp``) comes back when,
  in addition, ``tp`` is unchanged (the stream is seeded by the TP rank and covers the shard of
  that rank). Ranks without a counterpart keep the streams the job seeded at start, the same
  decision on every TP rank of a group. With dropout on, a run resumed under another layout is
  therefore a valid continuation, not the uninterrupted run's masks: a full activation's mask
  at tp=2 came from two TP streams, which no tp=1 stream reproduces.

Why not map missing coordinates to some other saved stream: a stream continued on a rank whose
part of the model or data differs means nothing more than a fresh one, and two ranks fed from
one saved stream would draw correlated masks.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from merak.runtime.distributed.grid import Coord, ParallelDims
from merak.runtime.tensor_parallel.random import TPRNGTracker

__all__ = ["coord_name", "capture", "restore", "restore_sources", "tp_trackers"]

TP_STREAMS = "tp_rng"  # key of the TP trackers' states in a rank's captured streams


def coord_name(coord: Coord) -> str:
    """A rank's coordinate as text, e.g. ``pp01-dp00-tp00`` (keys its RNG states)."""
    return f"pp{coord.pp:02d}-dp{coord.dp:02d}-tp{coord.tp:02d}"


def tp_trackers(stage: nn.Module) -> list[TPRNGTracker]:
    """The tensor-parallel streams of ``stage`` (one per sharded stage or model chunk that has
    its own), each once, in module order."""
    found: dict[int, TPRNGTracker] = {}
    for module in stage.modules():
        tracker = getattr(module, "tp_rng", None)
        if isinstance(tracker, TPRNGTracker):
            found.setdefault(id(tracker), tracker)
    return list(found.values())


def capture(stage: nn.Module) -> dict[str, Any]:
    """This rank's default streams and its stage's TP streams, as plain values and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's state as plain values and a tensor, so the file loads with weights_only=True
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        TP_STREAMS: [tracker.state_dict() for tracker in tp_trackers(stage)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def restore(default: Mapping[str, Any] | None, tp: Mapping[str, Any] | None, stage: nn.Module) -> list[str]:
    """Continue the default streams captured in ``default`` and the TP streams captured in ``tp``
    (either may be ``None``: keep the current ones). Returns warnings (nothing raised for a CUDA
    state without CUDA, or a checkpoint saved before TP streams were captured)."""
    warnings: list[str] = []
    if default is not None:
        random.setstate(_as_tuples(default["python"]))
        n = default["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(default["torch"])
        if "cuda" in default:
            if torch.cuda.is_available():
                torch.cuda.set_rng_state(default["cuda"])
            else:
                warnings.append("the checkpoint holds a CUDA RNG state but CUDA is not available; not restored")
    if tp is not None:
        trackers, saved = tp_trackers(stage), list(tp.get(TP_STREAMS, ()))
        if len(saved) == len(trackers):
            for tracker, value in zip(trackers, saved):
                tracker.load_state_dict(value)
        else:
            warnings.append(f"the checkpoint holds {len(saved)} tensor-parallel RNG stream(s) for this rank, the "
                            f"stage has {len(trackers)}; they keep their current state")
    return warnings


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples; be robust to a loader that returns lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def restore_sources(saved: Mapping[str, int], dims: ParallelDims, coord: Coord) -> tuple[str | None, str | None]:
    """(the saved coordinate whose default streams this rank continues, the one whose TP streams
    it continues), ``None`` where it keeps its own; ``saved`` is the saving job's
    ``{"dp", "tp", "pp"}``. The rule is the module docstring's."""
    if (saved["dp"], saved["tp"], saved["pp"]) == (dims.dp, dims.tp, dims.pp):
        return coord_name(coord), coord_name(coord)
    if saved["pp"] != dims.pp or coord.dp >= saved["dp"]:
        return None, None
    default = coord_name(Coord(pp=coord.pp, dp=coord.dp, tp=0))
    return default, coord_name(coord) if saved["tp"] == dims.tp else None
