"""The model-parallel RNG stream: dropout on sharded activations differs across TP ranks.

Why: every TP rank seeds the default generator alike, so a dropout on a *sharded* activation
(attention probabilities of this rank's heads) would draw the same mask on every rank - the
shards of one full tensor would share a mask pattern, which no single-process run does. A
dropout on a *replicated* activation must, on the contrary, draw the same mask on every TP rank
(each rank holds the whole tensor and the copies must stay equal).

As Megatron's CUDA RNG tracker (``tensor_parallel/random.py``): replicated regions use the
default stream (same seed on every TP rank); random ops in sharded regions run inside
:meth:`TPRNGTracker.fork`, which swaps the device's default generator state for this rank's own
stream, seeded ``seed + TP_SEED_OFFSET + tp_rank``, and swaps it back afterwards. Swapping the
default state (rather than passing a generator) keeps every dropout spelling working:
``nn.Dropout``, ``F.dropout``, SDPA's ``dropout_p``.

Recomputation must draw the same masks again, so :func:`capture_streams` / :func:`restored_streams`
let :class:`~merak.runtime.memory.layer_checkpoint.ForwardState` save and replay the streams of
every live tracker along with the default one.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["TP_SEED_OFFSET", "TPRNGTracker", "ShardedRandom", "is_random_op", "capture_streams", "restored_streams"]

#: Offset of the model-parallel seed from the user's seed (Megatron's constant).
TP_SEED_OFFSET = 2718

_LIVE: "weakref.WeakSet[TPRNGTracker]" = weakref.WeakSet()


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class TPRNGTracker:
    """This TP rank's own RNG stream, per device, seeded ``seed + TP_SEED_OFFSET + tp_rank``."""

    def __init__(self, seed: int, tp_rank: int) -> None:
        self.seed = int(seed) + TP_SEED_OFFSET + int(tp_rank)
        self._states: dict[torch.device, torch.Tensor] = {}
        _LIVE.add(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> "TPRNGTracker":
        return self  # one stream per rank, shared by copies of the stage (as the TP group is)

    def state_dict(self) -> dict[str, Any]:
        """The seed and per-device states, for a checkpoint (a resumed run then draws the masks
        the uninterrupted run would have drawn)."""
        return {"seed": self.seed, "states": {str(d): s.clone() for d, s in self._states.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream saved by :meth:`state_dict` (same TP rank)."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"this TP rank's RNG stream is seeded {self.seed}, the checkpoint's {state['seed']}: "
                             "resume with the same seed and tensor-parallel layout")
        self._states = {torch.device(d): s.clone() for d, s in state["states"].items()}

    def reset(self) -> None:
        """Back to the seed's first state on every device (a run from the start again)."""
        self._states.clear()

    def state(self, device: torch.device) -> torch.Tensor:
        """The stream's current state on ``device`` (created from the seed on first use)."""
        device = torch.device(device)
        if device not in self._states:
            self._states[device] = torch.Generator(device).manual_seed(self.seed).get_state()
        return self._states[device]

    @contextlib.contextmanager
    def fork(self, device: torch.device) -> Iterator[None]:
        """Run a block with this stream as ``device``'s default generator; the default stream
        is left exactly as before, and this stream advances by what the block drew."""
        device = torch.device(device)
        saved = _get_state(device)
        _set_state(device, self.state(device))
        try:
            yield
        finally:
            self._states[device] = _get_state(device)
            _set_state(device, saved)


def capture_streams() -> tuple[tuple[TPRNGTracker, dict[torch.device, torch.Tensor]], ...]:
    """The current state of every live tracker (for a recomputation to replay)."""
    return tuple((t, dict(t._states)) for t in list(_LIVE))


@contextlib.contextmanager
def restored_streams(captured: tuple[tuple[TPRNGTracker, dict[torch.device, torch.Tensor]], ...]) -> Iterator[None]:
    """Run a block with the trackers as ``captured``; their current states are put back after."""
    current = capture_streams()
    for tracker, states in captured:
        tracker._states = dict(states)
    try:
        yield
    finally:
        for tracker, states in current:
            tracker._states = states


_DROPOUT_FUNCTIONS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                                "feature_alpha_dropout", "native_dropout"})


def is_random_op(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a graph call draws random numbers (a dropout module or function, or SDPA with a
    non-zero ``dropout_p``)."""
    if isinstance(target, nn.Module):
        return isinstance(target, nn.modules.dropout._DropoutNd)
    name = getattr(target, "__name__", str(target)).split(".")[-1]
    if name in _DROPOUT_FUNCTIONS:
        return True
    if name == "scaled_dot_product_attention":
        p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
        return not (isinstance(p, (int, float)) and p == 0)
    return False


def _device_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


class ShardedRandom(nn.Module):
    """A random op of a sharded region (``op``: a module or a function), run in the TP rank's
    own stream."""

    def __init__(self, op: Callable[..., Any], tracker: TPRNGTracker) -> None:
        super().__init__()
        self.op = op
        self.tracker = tracker

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.tracker.fork(_device_of(args, kwargs)):
            return self.op(*args, **kwargs)
