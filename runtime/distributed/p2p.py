"""Point-to-point exchange of nested Python structures between pipeline neighbours.

A stage sends whatever its graph hands to the next stage: tensors of any dtype, tuples, dicts,
``None``, ints, ``torch.Size``... The *structure* (with tensor shapes/dtypes) travels as a
pickled description only when it differs from the last one sent on that channel - the peer and
the message's ``channel`` name (the executor names one per virtual-stage boundary and
direction, so the activations and gradients of several chunks interleaving on one link do not
evict each other's description); otherwise a two-number header says "same as before" and only
tensor bytes move. Every message is then:

    header int64[2] = (description length or 0, number of tensors)
    [description bytes]                  only when the structure changed
    tensor 0 bytes, tensor 1 bytes, ...  each sent in place as a uint8 view (no packing copy)

Messages on one (sender, receiver) pair are matched in FIFO order, so data needs no tags.
Messages are posted in groups (:meth:`P2P.exchange`): all of a group's sends and the receives
of its headers in one ``batch_isend_irecv``, the receives of descriptions and payloads in one
round each, so two neighbours sending to each other complete under NCCL's rendezvous
semantics. Sends are asynchronous (the buffers are kept alive until :meth:`P2P.wait_sends`;
under ``MERAK_P2P=rendezvous`` a group waits for its sends' acknowledgements); receives
block, always with a timeout whose error names this rank, the peer and what was awaited. A received tensor requires grad exactly when
the sent one did.
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Callable, Hashable

import torch
import torch.distributed as dist

from merak.runtime.distributed import groups
from merak.runtime.distributed.groups import Group


class P2PTimeoutError(RuntimeError):
    """A distributed wait did not complete in time (or its peer died)."""


def wait_with_timeout(work: dist.Work, timeout_s: float, what: str, *, device: torch.device | str | None = None) -> None:
    """Wait for an async op; turn timeouts and dead peers into an error naming rank and ``what``.

    Two ways to wait, chosen by :func:`waits_on_host` from ``device`` (default: the default
    process group's backend):

    * host (gloo, CPU tensors): ``work.wait(timeout)`` - the host blocks until the data is
      there, which it must do anyway before the CPU computes on it;
    * CUDA (NCCL): ``work.wait()`` with no timeout, which only makes the current stream wait
      for the communication kernel - the host goes on queueing work. A timed wait would spin
      on the host until the kernel finished, stalling every overlapped TP all-reduce. The
      limit is then the process group's own (``init_process_group(timeout=MERAK_TIMEOUT_S)``,
      enforced by NCCL's watchdog); its error is re-raised here with this rank and ``what``.
    """
    try:
        if waits_on_host(device):
            ok = work.wait(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            ok = work.wait()
    except RuntimeError as exc:  # gloo: timeout / closed connection; NCCL: DistBackendError
        raise _wait_error(timeout_s, what, exc) from exc
    if ok is False:
        me = dist.get_rank() if dist.is_initialized() else 0
        raise P2PTimeoutError(f"rank {me} timed out after {timeout_s:.0f}s waiting for {what}")


def waits_on_host(device: torch.device | str | None = None) -> bool:
    """Whether a wait on ``device``'s communication may block the host with a timeout: yes for
    the CPU (gloo), no for CUDA (NCCL; see :func:`wait_with_timeout`). Without ``device``, the
    default process group's backend decides."""
    if device is not None:
        return torch.device(device).type == "cpu"
    return not (dist.is_initialized() and "nccl" in str(dist.get_backend()).lower())


def _wait_error(timeout_s: float, what: str, exc: BaseException) -> P2PTimeoutError:
    me = dist.get_rank() if dist.is_initialized() else 0
    text = str(exc)
    cause = "timed out" if "imed out" in text or "timeout" in text.lower() else "failed (peer process probably died)"
    return P2PTimeoutError(
        f"rank {me} {cause} after waiting up to {timeout_s:.0f}s for {what}. "
        f"Check that rank's log for an earlier error; raise the limit with "
        f"MerakArguments(p2p_timeout=...) or MERAK_TIMEOUT_S if the step is legitimately slow. "
        f"[backend said: {text.strip()[:200]}]"
    )


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


@dataclass(frozen=True)
class Outgoing:
    """A message to send: ``obj`` to global rank ``dst``; ``what`` names it in errors.
    ``channel`` names the stream of messages it belongs to (see :class:`P2P`); the receiver
    must name it the same way."""

    obj: Any
    dst: int
    what: str = "a message"
    channel: Hashable = None


@dataclass(frozen=True)
class Incoming:
    """A message to receive from global rank ``src``; ``what`` names it in errors."""

    src: int
    what: str = "a message"
    channel: Hashable = None


@dataclass
class _Encoded:
    """An outgoing message as the buffers each round sends: ``header`` and ``desc`` on the host
    side (see :class:`P2P`), ``payload`` on the payload device."""

    dst: int
    what: str
    header: torch.Tensor
    desc: torch.Tensor | None
    payload: list[torch.Tensor]


@dataclass(frozen=True)
class _Op:
    """One send or receive of a round and the process group it travels on."""

    is_send: bool
    buf: torch.Tensor
    peer: int
    what: str
    group: Group = None
    tag: int = 0

    def p2p_op(self) -> dist.P2POp:
        return dist.P2POp(dist.isend if self.is_send else dist.irecv, self.buf, self.peer, self.group, self.tag)


#: ``batch_isend_irecv`` tags: data, and the acknowledgements of ``MERAK_P2P=rendezvous``
#: (which travel against the data and must never match a data message from the same peer).
_DATA_TAG, _ACK_TAG = 0, 1

#: ``MERAK_P2P`` values: ``native`` - the backend's own send semantics (gloo buffers sends);
#: ``rendezvous`` - on gloo, a send completes only once its receiver posted the matching
#: receive (an acknowledgement travels back), as NCCL's large messages do, so the CPU test
#: suite hangs - into the rank-named timeout - wherever a GPU job would.
P2P_MODES = ("native", "rendezvous")


def p2p_mode(mode: str | None = None) -> str:
    """``mode``, or ``MERAK_P2P`` from the environment (default ``native``), checked."""
    mode = mode or os.environ.get("MERAK_P2P", "native") or "native"
    if mode not in P2P_MODES:
        raise ValueError(f"MERAK_P2P must be one of {P2P_MODES}, got {mode!r}")
    return mode


class P2P:
    """Nested-structure send/receive with structure descriptions cached per peer and channel.

    One instance per rank; ``device`` is where payload tensors live (cpu for gloo, cuda for
    nccl). :meth:`exchange` posts a group of sends and receives together - what NCCL needs for
    two neighbours sending to each other (rendezvous: a large send completes only while its
    receive is posted). The group's receives run in three rounds: the headers, the structure
    descriptions that changed, then the payloads - the receiver needs the first two to size the
    third. On the host the group's sends (all three parts of each) go out with the first round
    (on CUDA the payload waits for the last; see below): had they
    followed the receives round by round, a group receiving a message computed from one it
    sends (the V turn of zb_v and dualpipe_v) would deadlock. Headers and descriptions are
    small (eager); payloads are what :mod:`merak.runtime.pipeline.replay` checks under
    rendezvous semantics.

    **Two process groups.** The payload travels on ``payload_group`` (default: the world), the
    headers and descriptions on ``header_group`` (default: the payload group). A GPU job gives
    a host-side (gloo) header group (:meth:`for_grid` takes the grid's ``host_group``), so the
    receiver reads a header - which it must, to size the payload buffers - from host memory:
    the steady state does no device->host synchronisation at all, and the payload receive is
    posted without waiting for the device. On gloo the two are one group and every round is
    one ``batch_isend_irecv``, as before.

    **When the payload sends go out.** On the host (gloo, and ``MERAK_P2P=rendezvous``) with the
    first round, as above: a host that blocks in a receive must already have let its sends go.
    On CUDA (``sends_with_payload``) with the payload round, in one ``batch_isend_irecv`` with
    the payload receives - one NCCL group per exchange, which is what NCCL requires of facing
    large messages (a send in one group and its peer's send in another deadlock once the
    message outgrows NCCL's buffer: each group's kernel waits for a receive queued behind the
    other). That is safe on CUDA only because no wait there blocks the host
    (:func:`wait_with_timeout`): a rank's host moves on after posting a receive, so its next
    headers - host messages, posted at the start of each exchange - never wait on its device.
    The host then replays the schedule with every message eager (what the validator's
    rendezvous replay implies), and the device runs one group per exchange with sends and
    receives posted together, no later than the host-side model posts them.

    Why this and not static shapes (Megatron's ``tensor_shape``, or
    ``torch.distributed.pipelining``'s shape inference once per run): HF models change shapes
    between batches (dynamic padding, evaluation's last batch, generation-style inputs) and
    send nested structures; negotiating every message on the host keeps that generality and
    costs one small host message per tensor group - a description only when the structure
    changed - instead of a device sync. Why not header on the device with a cache: the
    receiver cannot know a message's structure is unchanged without reading *something* the
    sender wrote, and on the device that read is the sync.
    """

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 300.0, mode: str | None = None, *,
                 payload_group: Group = None, header_group: Group = None,
                 sends_with_payload: bool | None = None) -> None:
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.mode = p2p_mode(mode)
        if self.mode == "rendezvous" and self.device.type != "cpu":
            raise ValueError("MERAK_P2P=rendezvous emulates NCCL's rendezvous sends on gloo (cpu); "
                             f"on {self.device.type} unset it: the backend already behaves so")
        # payload sends join the payload round where waits leave the host free (CUDA); see above
        self.sends_with_payload = not waits_on_host(self.device) if sends_with_payload is None else sends_with_payload
        self.payload_group = payload_group
        self.header_group = payload_group if header_group is None else header_group
        # a separate header group is host-side by contract (see the class docstring)
        self.header_device = self.device if header_group is None else groups.device(header_group)
        # structure descriptions, cached per (peer, channel)
        self._sent_desc: dict[tuple[int, Hashable], bytes] = {}
        self._recv_desc: dict[tuple[int, Hashable], Any] = {}
        self._pending: list[tuple[dist.Work, _Op]] = []

    @classmethod
    def for_grid(cls, grid: Any, device: torch.device | str, timeout_s: float = 300.0, mode: str | None = None) -> "P2P":
        """The p2p layer of a :class:`~merak.runtime.distributed.grid.Grid`'s rank: payloads on
        the world group, headers on the grid's host-side group when it has one (GPU jobs)."""
        return cls(device, timeout_s, mode, header_group=getattr(grid, "host_group", None))

    # ---- the group exchange -----------------------------------------------------------
    def exchange(self, sends: Sequence[Outgoing] = (), recvs: Sequence[Incoming] = ()) -> list[Any]:
        """Send ``sends`` and receive ``recvs`` as one group; return the received objects in
        the order of ``recvs``. Sends are left in flight (see :meth:`wait_sends`)."""
        rendezvous = self.mode == "rendezvous"
        out = [self._encode(m) for m in sends]
        headers = [torch.empty(2, dtype=torch.int64, device=self.header_device) for _ in recvs]
        # every part of every send goes out with the first round: a peer receiving from this
        # rank never waits for this rank's own receives (see the class docstring)
        first = [op for e in out for op in self._send_ops(e, payload=not self.sends_with_payload)]
        first += [self._host_op(False, h, r.src, r.what) for h, r in zip(headers, recvs)]
        if rendezvous:  # the acknowledgements of this group's sends, waited for at its end
            first += [self._ack_op(False, e.dst, e.what) for e in out]
        acks = self._round(first)
        counts = [h.tolist() for h in headers]  # host reads on a GPU job too (see the class docstring)
        descs = {i: torch.empty(n, dtype=torch.uint8, device=self.header_device) for i, (n, _) in enumerate(counts) if n}
        self._round([self._host_op(False, buf, recvs[i].src, f"{recvs[i].what} (structure)") for i, buf in descs.items()])
        skeletons, slots, tensors = [], [], []
        for i, (msg, (_, num_tensors)) in enumerate(zip(recvs, counts)):
            if i in descs:
                self._recv_desc[(msg.src, msg.channel)] = pickle.loads(descs[i].cpu().numpy().tobytes())
            skeleton, found = self._skeleton(msg, int(num_tensors))
            skeletons.append(skeleton)
            slots.append(found)
            tensors.append([torch.empty(slot.shape, dtype=slot.dtype, device=self.device) for slot in found])
        last = [self._payload_op(True, t, e.dst, e.what) for e in out for t in e.payload] if self.sends_with_payload else []
        last += [self._payload_op(False, _as_bytes(t), msg.src, msg.what)
                 for msg, ts in zip(recvs, tensors) for t in ts if t.numel() > 0]
        if rendezvous:  # tell each sender its receive is posted now
            last += [self._ack_op(True, msg.src, msg.what) for msg in recvs]
        self._round(last)
        for work, op in acks:  # the group's sends complete only once received
            wait_with_timeout(work, self.timeout_s, f"rank {op.peer} to post the receive of {op.what} "
                                                    f"(MERAK_P2P=rendezvous: a send completes only then)",
                              device=self.device)
        for found, ts in zip(slots, tensors):
            for slot, t in zip(found, ts):
                # the sender's flag: a tensor it does not differentiate gets no gradient back
                if slot.requires_grad and (t.is_floating_point() or t.is_complex()):
                    t.requires_grad_(True)
        return [unflatten(sk, ts) for sk, ts in zip(skeletons, tensors)]

    def send(self, obj: Any, dst: int, what: str = "a message", channel: Hashable = None) -> None:
        """Send ``obj`` to global rank ``dst`` as a group of its own (see :meth:`exchange`)."""
        self.exchange(sends=[Outgoing(obj, dst, what, channel)])

    def recv(self, src: int, what: str = "a message", channel: Hashable = None) -> Any:
        """Receive the next structure sent to this rank by global rank ``src`` on ``channel``."""
        return self.exchange(recvs=[Incoming(src, what, channel)])[0]

    # ---- messages and their operations ------------------------------------------------
    def _encode(self, msg: Outgoing) -> _Encoded:
        skeleton, tensors = flatten(msg.obj)
        payload = [t.detach().contiguous() for t in tensors]
        desc = pickle.dumps(skeleton)
        changed = self._sent_desc.get((msg.dst, msg.channel)) != desc
        header = torch.tensor([len(desc) if changed else 0, len(payload)], dtype=torch.int64, device=self.header_device)
        desc_buf = None
        if changed:
            desc_buf = torch.frombuffer(bytearray(desc), dtype=torch.uint8).to(self.header_device)
            self._sent_desc[(msg.dst, msg.channel)] = desc
        return _Encoded(msg.dst, msg.what, header, desc_buf, [_as_bytes(t) for t in payload if t.numel() > 0])

    def _send_ops(self, e: _Encoded, payload: bool = True) -> list[_Op]:
        """A message's sends in the order the receiver takes them: header, description and
        (with ``payload``) the payload tensors."""
        ops = [self._host_op(True, e.header, e.dst, e.what)]
        if e.desc is not None:
            ops.append(self._host_op(True, e.desc, e.dst, f"{e.what} (structure)"))
        return ops + ([self._payload_op(True, t, e.dst, e.what) for t in e.payload] if payload else [])

    def _host_op(self, is_send: bool, buf: torch.Tensor, peer: int, what: str) -> _Op:
        return _Op(is_send, buf, peer, what, self.header_group, _DATA_TAG)

    def _payload_op(self, is_send: bool, buf: torch.Tensor, peer: int, what: str) -> _Op:
        return _Op(is_send, buf, peer, what, self.payload_group, _DATA_TAG)

    def _ack_op(self, is_send: bool, peer: int, what: str) -> _Op:
        """``MERAK_P2P=rendezvous``: a one-byte acknowledgement on the payload group, sent when
        the receive of ``what`` is posted (``is_send``) or awaited by its sender."""
        what = f"the acknowledgement of {what}" if is_send else what
        return _Op(is_send, torch.zeros(1, dtype=torch.uint8, device=self.device), peer, what,
                   self.payload_group, _ACK_TAG)

    def _skeleton(self, msg: Incoming, num_tensors: int) -> tuple[Any, list[_TensorSlot]]:
        if (msg.src, msg.channel) not in self._recv_desc:
            raise RuntimeError(f"protocol error: rank {msg.src} sent {msg.what} without a structure first")
        skeleton = self._recv_desc[(msg.src, msg.channel)]
        slots = _slots(skeleton)
        if len(slots) != num_tensors:
            raise RuntimeError(
                f"protocol error: rank {msg.src} announced {num_tensors} tensors for {msg.what}, "
                f"structure holds {len(slots)}"
            )
        return skeleton, slots

    # ---- posting and waiting ----------------------------------------------------------
    def _round(self, ops: list[_Op]) -> list[tuple[dist.Work, _Op]]:
        """Post one round - one ``batch_isend_irecv`` per process group it uses (a batch must
        stay inside one group) - and wait for its data receives.

        Sends are kept (with their buffers: isend does not own them) until they complete; the
        receives of acknowledgements (``MERAK_P2P=rendezvous``) are returned, not waited for.
        """
        if not ops:
            return []
        batches: dict[int, list[_Op]] = {}
        for op in ops:
            batches.setdefault(id(op.group), []).append(op)
        posted: list[tuple[dist.Work, _Op]] = []
        for batch in batches.values():
            posted += zip(dist.batch_isend_irecv([op.p2p_op() for op in batch]), batch)
        self._pending += [(work, op) for work, op in posted if op.is_send]
        for work, op in posted:
            if not op.is_send and op.tag == _DATA_TAG:
                wait_with_timeout(work, self.timeout_s, f"{op.what} from rank {op.peer}", device=op.buf.device)
        self._reap()
        return [(work, op) for work, op in posted if not op.is_send and op.tag == _ACK_TAG]

    def _reap(self) -> None:
        self._pending = [p for p in self._pending if not p[0].is_completed()]

    def wait_sends(self) -> None:
        """Block until every started send completed (before buffers are reused or at step end)."""
        me = dist.get_rank()
        for work, op in self._pending:
            wait_with_timeout(work, self.timeout_s, f"rank {op.peer} to receive {op.what} (sent by rank {me})",
                              device=op.buf.device)
        self._pending.clear()
