"""Point-to-point exchange of nested Python structures between pipeline neighbours.

A stage sends whatever its graph hands to the next stage: tensors of any dtype, tuples, dicts,
``None``, ints, ``torch.Size``... The *structure* (with tensor shapes/dtypes) travels as a
pickled description only when it differs from the last one sent on that channel; otherwise a
two-number header says "same as before" and only tensor bytes move. Every message is then:

    header int64[2] = (description length or 0, number of tensors)
    [description bytes]                  only when the structure changed
    tensor 0 bytes, tensor 1 bytes, ...  each sent in place as a uint8 view (no packing copy)

Messages on one (sender, receiver) pair are matched in FIFO order, so no tags are needed.
Sends are asynchronous (the buffers are kept alive until :meth:`P2P.wait_sends`); receives
block, always with a timeout whose error names this rank, the peer and what was awaited.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


class P2PTimeoutError(RuntimeError):
    """A distributed wait did not complete in time (or its peer died)."""


def wait_with_timeout(work: dist.Work, timeout_s: float, what: str) -> None:
    """Wait for an async op; convert gloo/NCCL timeouts and dead peers into a clear error."""
    try:
        ok = work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:  # gloo raises on timeout and on a closed connection
        me = dist.get_rank() if dist.is_initialized() else 0
        text = str(exc)
        cause = "timed out" if "imed out" in text else "failed (peer process probably died)"
        raise P2PTimeoutError(
            f"rank {me} {cause} after waiting up to {timeout_s:.0f}s for {what}. "
            f"Check that rank's log for an earlier error; raise the limit with "
            f"MerakArguments(p2p_timeout=...) or MERAK_TIMEOUT_S if the step is legitimately slow. "
            f"[backend said: {text.strip()[:200]}]"
        ) from exc
    if ok is False:
        me = dist.get_rank() if dist.is_initialized() else 0
        raise P2PTimeoutError(f"rank {me} timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass(frozen=True)
class _TensorSlot:
    """Placeholder for a tensor inside a pickled structure description."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _map_leaves(obj: Any, is_leaf: Callable[[Any], bool], fn: Callable[[Any], Any]) -> Any:
    """Rebuild ``obj`` with ``fn`` applied to its leaves, through dicts, plain lists/tuples and
    namedtuples. Other tuple subclasses (``torch.Size``) and all other values stay opaque."""
    if is_leaf(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_leaves(v, is_leaf, fn)) for k, v in obj.items())
    if _is_namedtuple(obj):
        return type(obj)(*(_map_leaves(v, is_leaf, fn) for v in obj))
    if type(obj) in (tuple, list):
        return type(obj)(_map_leaves(v, is_leaf, fn) for v in obj)
    return obj


def flatten(obj: Any) -> tuple[Any, list[torch.Tensor]]:
    """Split ``obj`` into a picklable skeleton (tensors replaced by slots) and its tensors."""
    tensors: list[torch.Tensor] = []

    def to_slot(t: torch.Tensor) -> _TensorSlot:
        tensors.append(t)
        return _TensorSlot(len(tensors) - 1, tuple(t.shape), t.dtype, t.requires_grad)

    return _map_leaves(obj, lambda x: isinstance(x, torch.Tensor), to_slot), tensors


def unflatten(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    return _map_leaves(skeleton, lambda x: isinstance(x, _TensorSlot), lambda slot: tensors[slot.index])


def _slots(skeleton: Any) -> list[_TensorSlot]:
    found: list[_TensorSlot] = []
    _map_leaves(skeleton, lambda x: isinstance(x, _TensorSlot), found.append)
    return sorted(found, key=lambda s: s.index)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor: gloo and NCCL move any dtype as raw bytes."""
    return t.reshape(-1).view(torch.uint8)


class P2P:
    """Nested-structure send/receive with per-peer cached structure descriptions.

    One instance per rank; ``device`` is where tensors live (cpu for gloo, cuda for nccl).
    """

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 300.0) -> None:
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self._sent_desc: dict[int, bytes] = {}
        self._recv_desc: dict[int, Any] = {}
        self._pending: list[tuple[dist.Work, Any, int, str]] = []

    # ---- sending ----------------------------------------------------------------------
    def send(self, obj: Any, dst: int, what: str = "a message") -> None:
        """Start sending ``obj`` to global rank ``dst``; returns without waiting."""
        skeleton, tensors = flatten(obj)
        payload = [t.detach().contiguous() for t in tensors]
        desc = pickle.dumps(skeleton)
        changed = self._sent_desc.get(dst) != desc
        header = torch.tensor(
            [len(desc) if changed else 0, len(payload)], dtype=torch.int64, device=self.device
        )
        bufs = [header]
        if changed:
            bufs.append(torch.frombuffer(bytearray(desc), dtype=torch.uint8).to(self.device))
            self._sent_desc[dst] = desc
        bufs.extend(_as_bytes(t) for t in payload if t.numel() > 0)
        for buf in bufs:
            # Keep ``buf`` referenced until the send completes: isend does not own it.
            self._pending.append((dist.isend(buf, dst=dst), buf, dst, what))
        self._reap()

    def _reap(self) -> None:
        self._pending = [p for p in self._pending if not p[0].is_completed()]

    def wait_sends(self) -> None:
        """Block until every started send completed (before buffers are reused or at step end)."""
        me = dist.get_rank()
        for work, _buf, dst, what in self._pending:
            wait_with_timeout(work, self.timeout_s, f"rank {dst} to receive {what} (sent by rank {me})")
        self._pending.clear()

    # ---- receiving --------------------------------------------------------------------
    def _recv_into(self, buf: torch.Tensor, src: int, what: str) -> None:
        work = dist.irecv(buf, src=src)
        wait_with_timeout(work, self.timeout_s, f"{what} from rank {src}")

    def recv(self, src: int, what: str = "a message") -> Any:
        """Receive the next structure sent to this rank by global rank ``src``."""
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        self._recv_into(header, src, what)
        desc_len, num_tensors = (int(v) for v in header.tolist())
        if desc_len:
            raw = torch.empty(desc_len, dtype=torch.uint8, device=self.device)
            self._recv_into(raw, src, f"{what} (structure)")
            self._recv_desc[src] = pickle.loads(raw.cpu().numpy().tobytes())
        if src not in self._recv_desc:
            raise RuntimeError(f"protocol error: rank {src} sent {what} without a structure first")
        skeleton = self._recv_desc[src]
        slots = _slots(skeleton)
        if len(slots) != num_tensors:
            raise RuntimeError(
                f"protocol error: rank {src} announced {num_tensors} tensors for {what}, "
                f"structure holds {len(slots)}"
            )
        tensors = []
        for slot in slots:
            t = torch.empty(slot.shape, dtype=slot.dtype, device=self.device)
            if t.numel() > 0:
                self._recv_into(_as_bytes(t), src, what)
            tensors.append(t)
        return unflatten(skeleton, tensors)
