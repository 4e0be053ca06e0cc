"""Point-to-point exchange of nested Python structures between pipeline neighbours.

A stage sends whatever its graph hands to the next stage: tensors of any dtype, tuples, dicts,
``None``, ints, ``torch.Size``... The *structure* (with tensor shapes/dtypes) travels as a
pickled description only when it differs from the last one sent on that channel - the peer and
the message's ``channel`` name (the executor names one per virtual-stage boundary and
direction, so the activations and gradients of several chunks interleaving on one link do not
evict each other's description); otherwise a two-number header says "same as before" and only
tensor bytes move. Every message is:

    header int64[2] = (description length or 0, number of tensors)          tag HEADER
    [description bytes]                  only when the structure changed    tag DESCRIPTION
    tensor 0 bytes, tensor 1 bytes, ...  each sent in place as a uint8 view (no packing copy)

**Speculative payloads** (on the host, where a wait blocks the CPU anyway: gloo). A receiver that
knows a channel's structure posts the payload receives *with* the header receive, sized as the
last message on that channel - one round trip per message in the steady state instead of two
(header, then payload), which on a busy host is a scheduling delay per hand-over. Sender and
receiver keep the same per-channel cache, so the sender knows when the receiver speculated:

* structure unchanged: the payload goes on tag SPECULATIVE and lands in the posted buffers;
* structure changed: the sender first fills the posted buffers with a same-sized filler (tag
  SPECULATIVE, discarded), then sends the description and the real payload on tag FRESH, which
  the receiver posts once it has read them - the per-tag FIFO order stays the same on both
  sides however many messages one exchange carries;
* a channel's first message has no cached structure: description and payload, tag FRESH.

On CUDA (NCCL) the payload round keeps its own group (see :class:`P2P`): no speculation.
Messages on one (sender, receiver) pair and tag are matched in FIFO order, so data needs no
sequence numbers. Messages are posted in groups (:meth:`P2P.exchange`): all of a group's sends,
the receives of its headers and speculative payloads in one ``batch_isend_irecv``, the receives
of descriptions and fresh payloads in one round each, so two neighbours sending to each other
complete under NCCL's rendezvous semantics. Sends are asynchronous (the buffers are kept alive
until :meth:`P2P.wait_sends`; under ``MERAK_P2P=rendezvous`` a group waits for its sends'
acknowledgements); receives block, always with a timeout whose error names this rank, the peer
and what was awaited. A received tensor requires grad exactly when the sent one did.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections import deque
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


def _byte_sizes(skeleton: Any) -> list[int]:
    """The byte sizes of the payload buffers a message of this structure travels in."""
    sizes = [torch.Size(slot.shape).numel() * slot.dtype.itemsize for slot in _slots(skeleton)]
    return [n for n in sizes if n > 0]


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
    side (see :class:`P2P`), ``payload`` on the payload device - on tag ``payload_tag``, after
    ``filler`` (buffers as large as the receiver's speculative ones, when the structure changed)."""

    dst: int
    what: str
    header: torch.Tensor
    desc: torch.Tensor | None
    payload: list[torch.Tensor]
    payload_tag: int
    filler: list[torch.Tensor]


@dataclass
class _Receiving:
    """One message being received: its header, then its tensors - ``speculative`` when they were
    posted with the header, sized as the channel's last message (see the module docstring)."""

    msg: Incoming
    header: torch.Tensor
    speculative: list[torch.Tensor] | None
    #: the first round's receives when :meth:`P2P.prefetch` posted them ahead of the exchange
    posted: list[tuple[dist.Work, _Op]] | None = None


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


#: ``batch_isend_irecv`` tags, one FIFO stream each (see the module docstring): headers, the
#: acknowledgements of ``MERAK_P2P=rendezvous`` (which travel against the data and must never
#: match a data message from the same peer), descriptions, payloads posted with their header,
#: payloads posted after their description.
_HEADER_TAG, _ACK_TAG, _DESC_TAG, _SPECULATIVE_TAG, _FRESH_TAG = 0, 1, 2, 3, 4

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
    receive is posted). The group's receives run in up to three rounds: the headers (with the
    speculative payloads, on the host), the structure descriptions that changed, then the
    payloads not yet posted - the receiver needs the first two to size the third; in the
    steady state on the host only the first round has anything to do. On the host the group's
    sends (every part of each) go out with the first round (on CUDA the payload waits for the
    last; see below): had they
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
        self._sent_sizes: dict[tuple[int, Hashable], list[int]] = {}  # payload bytes of each tensor
        self._recv_desc: dict[tuple[int, Hashable], Any] = {}
        self._pending: list[tuple[dist.Work, _Op]] = []
        self._inbox: dict[int, deque[_Receiving]] = {}  # prefetched receives, per sender in its send order

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
        pending = self._start_receives(recvs)
        # every part of every send goes out with the first round: a peer receiving from this
        # rank never waits for this rank's own receives (see the class docstring)
        first = [op for e in out for op in self._send_ops(e, payload=not self.sends_with_payload)]
        first += [op for p in pending if p.posted is None for op in self._first_receive_ops(p)]
        if rendezvous:  # the acknowledgements of this group's sends, waited for at its end
            first += [self._ack_op(False, e.dst, e.what) for e in out]
        acks = self._round(first, also_await=[w for p in pending for w in p.posted or ()])
        counts = [p.header.tolist() for p in pending]  # host reads on a GPU job too (see the class docstring)
        descs = {i: torch.empty(n, dtype=torch.uint8, device=self.header_device) for i, (n, _) in enumerate(counts) if n}
        self._round([self._host_op(False, buf, recvs[i].src, f"{recvs[i].what} (structure)", _DESC_TAG)
                     for i, buf in descs.items()])
        skeletons, slots, tensors, last = [], [], [], []
        for i, (p, (_, num_tensors)) in enumerate(zip(pending, counts)):
            msg = p.msg
            known = self._recv_desc.get((msg.src, msg.channel))  # what the sender's "changed" refers to
            if i in descs:
                self._recv_desc[(msg.src, msg.channel)] = pickle.loads(descs[i].cpu().numpy().tobytes())
            skeleton, found = self._skeleton(msg, int(num_tensors))
            skeletons.append(skeleton)
            slots.append(found)
            if p.speculative is not None and i not in descs:
                tensors.append(p.speculative)  # filled in the first round
                continue
            tensors.append([torch.empty(slot.shape, dtype=slot.dtype, device=self.device) for slot in found])
            last += self._remaining_receive_ops(p, known, changed=i in descs, tensors=tensors[-1])
        if self.sends_with_payload:
            last = [op for e in out for op in self._payload_send_ops(e)] + last
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

    @property
    def speculates(self) -> bool:
        """Whether payloads of known structure travel on the speculative tag (host waits only;
        see the module docstring). Both ends of a link decide alike: they run the same backend."""
        return not self.sends_with_payload

    def prefetch(self, recvs: Sequence[Incoming]) -> None:
        """Post the first round of these receives now - the header and, where the structure is
        known, the payload buffers - so the bytes move while this rank computes; the
        :meth:`exchange` that names them later finds them posted and only waits. ``recvs``
        must be the next receives from their senders, in order.

        Host waits only (gloo): on CUDA the payload receives stay in their exchange's NCCL
        group (see the class docstring), so this does nothing there. Posting a receive early
        never blocks and can only let a sender complete sooner, so an order the rendezvous
        validator accepts stays deadlock-free.
        """
        if not self.speculates:
            return
        ops = []
        for msg in recvs:
            inbox = self._inbox.setdefault(msg.src, deque())
            p = self._new_receiving(msg, list(inbox))
            p.posted = []
            inbox.append(p)
            ops.append((p, self._first_receive_ops(p)))
        posted = self._post([op for _, p_ops in ops for op in p_ops])
        for p, p_ops in ops:
            p.posted, posted = posted[: len(p_ops)], posted[len(p_ops):]

    def _start_receives(self, recvs: Sequence[Incoming]) -> list[_Receiving]:
        """The group's receives: those :meth:`prefetch` posted (the next ones from each sender),
        then new ones."""
        pending: list[_Receiving] = []
        for msg in recvs:
            inbox = self._inbox.get(msg.src)
            if inbox:
                p = inbox.popleft()
                if p.msg.channel != msg.channel:
                    raise RuntimeError(f"protocol error: the next message prefetched from rank {msg.src} is "
                                       f"{p.msg.what} (channel {p.msg.channel}), but {msg.what} "
                                       f"(channel {msg.channel}) was asked for: prefetch in receive order")
                p.msg = msg
            else:
                p = self._new_receiving(msg, [q for q in pending if q.msg.src == msg.src])
            pending.append(p)
        return pending

    def _new_receiving(self, msg: Incoming, earlier: Sequence[_Receiving]) -> _Receiving:
        """A receive, with speculative payload buffers where they can be sized now: the channel's
        structure is known, and every ``earlier`` receive from the same sender whose header has
        not been read yet was speculative and on another channel (a second message's size
        depends on the first's header). So the speculative receives from one sender are
        posted in its send order, ahead of any posted after a header was read."""
        known = self._recv_desc.get((msg.src, msg.channel))
        ok = (self.speculates and known is not None
              and all(q.speculative is not None and q.msg.channel != msg.channel for q in earlier))
        speculative = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in _slots(known)] if ok else None
        return _Receiving(msg, torch.empty(2, dtype=torch.int64, device=self.header_device), speculative)

    def _first_receive_ops(self, p: _Receiving) -> list[_Op]:
        ops = [self._host_op(False, p.header, p.msg.src, p.msg.what)]
        return ops + [self._payload_op(False, _as_bytes(t), p.msg.src, p.msg.what, _SPECULATIVE_TAG)
                      for t in p.speculative or () if t.numel() > 0]

    def _remaining_receive_ops(self, p: _Receiving, known: Any, changed: bool, tensors: list[torch.Tensor]) -> list[_Op]:
        """The receives of a message after its header and description: what its sender put on
        the speculative tag (the payload, or - structure changed - a filler sized as ``known``,
        unless the first round already took it) and on the fresh tag (see the module docstring)."""
        msg, ops = p.msg, []
        payload = [_as_bytes(t) for t in tensors if t.numel() > 0]
        speculative_tag = self.speculates and known is not None
        if speculative_tag and changed and p.speculative is None:
            ops += [self._payload_op(False, torch.empty(n, dtype=torch.uint8, device=self.device), msg.src,
                                     f"{msg.what} (filler)", _SPECULATIVE_TAG) for n in _byte_sizes(known)]
        tag = _SPECULATIVE_TAG if speculative_tag and not changed else _FRESH_TAG
        return ops + [self._payload_op(False, t, msg.src, msg.what, tag) for t in payload]

    def send(self, obj: Any, dst: int, what: str = "a message", channel: Hashable = None) -> None:
        """Send ``obj`` to global rank ``dst`` as a group of its own (see :meth:`exchange`)."""
        self.exchange(sends=[Outgoing(obj, dst, what, channel)])

    def recv(self, src: int, what: str = "a message", channel: Hashable = None) -> Any:
        """Receive the next structure sent to this rank by global rank ``src`` on ``channel``."""
        return self.exchange(recvs=[Incoming(src, what, channel)])[0]

    # ---- messages and their operations ------------------------------------------------
    def _encode(self, msg: Outgoing) -> _Encoded:
        skeleton, tensors = flatten(msg.obj)
        payload = [_as_bytes(t.detach().contiguous()) for t in tensors if t.numel() > 0]
        desc = pickle.dumps(skeleton)
        key = (msg.dst, msg.channel)
        previous = self._sent_desc.get(key)
        changed = previous != desc
        header = torch.tensor([len(desc) if changed else 0, len(tensors)], dtype=torch.int64, device=self.header_device)
        desc_buf, filler, tag = None, [], _FRESH_TAG
        if self.speculates and previous is not None:  # the receiver posted buffers sized as the last message
            if changed:
                filler = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in self._sent_sizes[key]]
            else:
                tag = _SPECULATIVE_TAG
        if changed:
            desc_buf = torch.frombuffer(bytearray(desc), dtype=torch.uint8).to(self.header_device)
            self._sent_desc[key] = desc
            self._sent_sizes[key] = [t.numel() for t in payload]  # uint8 views: bytes
        return _Encoded(msg.dst, msg.what, header, desc_buf, payload, tag, filler)

    def _send_ops(self, e: _Encoded, payload: bool = True) -> list[_Op]:
        """A message's sends in the order the receiver takes them: header, filler, description
        and (with ``payload``) the payload tensors."""
        ops = [self._host_op(True, e.header, e.dst, e.what)]
        ops += [self._payload_op(True, t, e.dst, f"{e.what} (filler)", _SPECULATIVE_TAG) for t in e.filler]
        if e.desc is not None:
            ops.append(self._host_op(True, e.desc, e.dst, f"{e.what} (structure)", _DESC_TAG))
        return ops + (self._payload_send_ops(e) if payload else [])

    def _payload_send_ops(self, e: _Encoded) -> list[_Op]:
        return [self._payload_op(True, t, e.dst, e.what, e.payload_tag) for t in e.payload]

    def _host_op(self, is_send: bool, buf: torch.Tensor, peer: int, what: str, tag: int = _HEADER_TAG) -> _Op:
        return _Op(is_send, buf, peer, what, self.header_group, tag)

    def _payload_op(self, is_send: bool, buf: torch.Tensor, peer: int, what: str, tag: int) -> _Op:
        return _Op(is_send, buf, peer, what, self.payload_group, tag)

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
    def _round(self, ops: list[_Op], also_await: Sequence[tuple[dist.Work, _Op]] = ()) -> list[tuple[dist.Work, _Op]]:
        """Post one round and wait for its data receives (and those of ``also_await``, posted
        earlier by :meth:`prefetch`).

        The receives of acknowledgements (``MERAK_P2P=rendezvous``) are returned, not waited for.
        """
        posted = self._post(ops)
        for work, op in [*also_await, *posted]:
            if not op.is_send and op.tag != _ACK_TAG:
                wait_with_timeout(work, self.timeout_s, f"{op.what} from rank {op.peer}", device=op.buf.device)
        self._reap()
        return [(work, op) for work, op in posted if not op.is_send and op.tag == _ACK_TAG]

    def _post(self, ops: list[_Op]) -> list[tuple[dist.Work, _Op]]:
        """Post ``ops`` - one ``batch_isend_irecv`` per process group they use (a batch must stay
        inside one group) - in their order. Sends are kept (with their buffers: isend does not
        own them) until they complete."""
        if not ops:
            return []
        batches: dict[int, list[_Op]] = {}
        for op in ops:
            batches.setdefault(id(op.group), []).append(op)
        works: dict[int, dist.Work] = {}
        for batch in batches.values():
            works.update(zip(map(id, batch), dist.batch_isend_irecv([op.p2p_op() for op in batch])))
        posted = [(works[id(op)], op) for op in ops]
        self._pending += [(work, op) for work, op in posted if op.is_send]
        return posted

    def _reap(self) -> None:
        self._pending = [p for p in self._pending if not p[0].is_completed()]

    def wait_sends(self) -> None:
        """Block until every started send completed (before buffers are reused or at step end).
        Every prefetched receive must have been taken by an exchange by then."""
        me = dist.get_rank()
        left = [p.msg.what for inbox in self._inbox.values() for p in inbox]
        if left:
            raise RuntimeError(f"rank {me} prefetched receives no exchange took: {left}")
        for work, op in self._pending:
            wait_with_timeout(work, self.timeout_s, f"rank {op.peer} to receive {op.what} (sent by rank {me})",
                              device=op.buf.device)
        self._pending.clear()
