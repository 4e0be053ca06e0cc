"""Pipeline p2p layer: nested structures, every dtype, changing shapes, timeouts, dead peers."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from dist_harness import RankFailed
from merak.runtime.distributed.p2p import P2P, Incoming, Outgoing, flatten, unflatten


def messages() -> list:
    """A sequence with changing structure, shapes and dtypes (cache hits and misses)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    return [
        x,
        x + 1,  # same structure: header-only negotiation
        {"hidden": torch.randn(2, 7, generator=g), "mask": torch.rand(2, 7, generator=g) > 0.5,
         "shape": torch.Size([2, 7]), "step": 3, "none": None},
        (torch.arange(6, dtype=torch.int64).reshape(2, 3), [torch.ones(4, dtype=torch.float16),
                                                          torch.ones(2, dtype=torch.bfloat16) * 1.5]),
        torch.randn(9, 1, 2, generator=g),  # shape changes again
        {"empty": torch.empty(0, 4), "scalar": torch.tensor(2.5), "u8": torch.arange(5, dtype=torch.uint8),
         "i32": torch.tensor([-1, 7], dtype=torch.int32), "f64": torch.tensor([1e-300], dtype=torch.float64),
         "text": "non-tensor value"},
        None,
    ]


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def test_flatten_roundtrip_without_processes():
    for msg in messages():
        skeleton, tensors = flatten(msg)
        assert_same(msg, unflatten(skeleton, tensors))


def _ping_pong(rounds: int) -> int:
    """Rank 0 sends each message to 1, which echoes it back; both sides check content."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    p2p = P2P(timeout_s=30)
    checked = 0
    for _ in range(rounds):
        for i, msg in enumerate(messages()):
            if rank == 0:
                p2p.send(msg, dst=1, what=f"message {i}")
                assert_same(msg, p2p.recv(src=1, what=f"echo {i}"))
            else:
                got = p2p.recv(src=0, what=f"message {i}")
                assert_same(msg, got)
                p2p.send(got, dst=0, what=f"echo {i}")
            checked += 1
    p2p.wait_sends()
    return checked


def test_nested_roundtrip_two_ranks(dist_run):
    assert dist_run(_ping_pong, 2, 2) == [2 * len(messages())] * 2


def _ring_pipeline() -> float:
    """A 4-stage chain: each stage adds its rank and forwards; both directions at once."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    p2p = P2P(timeout_s=30)
    value = torch.zeros(4)
    if rank > 0:
        value = p2p.recv(src=rank - 1, what="activation")["x"]
    value = value + rank
    if rank < world - 1:
        p2p.send({"x": value, "tag": rank}, dst=rank + 1, what="activation")
        grad = p2p.recv(src=rank + 1, what="gradient")
    else:
        grad = value * 2
    if rank > 0:
        p2p.send(grad, dst=rank - 1, what="gradient")
    p2p.wait_sends()
    return float(grad[0])


def test_chain_both_directions(dist_run):
    # value at the last stage = 0+1+2+3 = 6; its "gradient" 12 travels back to every stage.
    assert dist_run(_ring_pipeline, 4) == [12.0] * 4


def _facing_exchange() -> list:
    """Both ranks send a large message to each other at the same time, as one group each (the
    1F1B steady state), three times with changing structure; returns what each received."""
    dist.init_process_group("gloo")
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    p2p = P2P(timeout_s=30)
    got = []
    for step, shape in enumerate([(256, 1024), (256, 1024), (3, 5)]):
        act = torch.full(shape, float(rank * 10 + step), requires_grad=True) * 1  # non-leaf
        payload = {"x": act, "mask": torch.ones(shape)}  # the mask does not require grad
        [back] = p2p.exchange([Outgoing(payload, peer, f"message {step}")], [Incoming(peer, f"message {step}")])
        got.append((float(back["x"][0, 0]), tuple(back["x"].shape),
                    back["x"].requires_grad, back["mask"].requires_grad))
    p2p.wait_sends()
    return got


def test_facing_exchange_as_one_group_honours_requires_grad(dist_run):
    r0, r1 = dist_run(_facing_exchange, 2)
    assert [g[0] for g in r0] == [10.0, 11.0, 12.0] and [g[0] for g in r1] == [0.0, 1.0, 2.0]
    assert r0[2][1] == (3, 5)
    assert all(g[2] and not g[3] for g in r0 + r1)  # the sender's flags, per tensor


def _wait_for_silent_peer() -> None:
    dist.init_process_group("gloo")
    p2p = P2P(timeout_s=2)
    if dist.get_rank() == 0:
        p2p.recv(src=1, what="activation of micro-batch 3")
    else:
        time.sleep(6)  # alive but never sends


def test_timeout_names_rank_peer_and_what(dist_run):
    with pytest.raises(RankFailed, match=r"rank 0 timed out after waiting up to 2s for "
                                         r"activation of micro-batch 3 from rank 1"):
        dist_run(_wait_for_silent_peer, 2, timeout=60)


def _wait_for_dead_peer() -> str:
    from merak.runtime.distributed.p2p import P2PTimeoutError

    dist.init_process_group("gloo")
    p2p = P2P(timeout_s=20)
    if dist.get_rank() == 1:
        return "exited"  # the harness tears this rank's process group down: a vanished stage
    start = time.monotonic()
    try:
        p2p.recv(src=1, what="gradient of micro-batch 0")
    except P2PTimeoutError as exc:
        return f"{time.monotonic() - start:.1f}s: {exc}"
    return "received nothing yet no error"


def test_dead_peer_fails_with_clear_error_instead_of_hanging(dist_run):
    report, _ = dist_run(_wait_for_dead_peer, 2, timeout=90)
    seconds, message = report.split("s: ", 1)
    assert "rank 0" in message and "gradient of micro-batch 0 from rank 1" in message
    assert float(seconds) <= 21  # bounded by the p2p timeout, never a hang


class _FakeWork:
    """Records how it was waited for; optionally fails as NCCL's watchdog timeout does."""

    def __init__(self, error: str | None = None) -> None:
        self.calls: list[dict] = []
        self.error = error

    def wait(self, **kwargs) -> bool:
        self.calls.append(kwargs)
        if self.error:
            raise RuntimeError(self.error)
        return True


def test_cuda_waits_leave_the_timeout_to_the_process_group():
    # CPU: a timed wait (gloo blocks the host anyway). CUDA: an untimed wait, which only orders
    # the stream - a timed one would poll on the host until the kernel finished.
    from merak.runtime.distributed.p2p import P2PTimeoutError, wait_with_timeout, waits_on_host

    assert waits_on_host("cpu") and not waits_on_host("cuda") and not waits_on_host(torch.device("cuda", 1))
    assert waits_on_host()  # no process group: the host
    host, device = _FakeWork(), _FakeWork()
    wait_with_timeout(host, 5, "x", device="cpu")
    wait_with_timeout(device, 5, "x", device="cuda")
    assert list(host.calls[0]) == ["timeout"] and device.calls == [{}]
    # the process group's timeout reaches the user with this rank, the peer and what
    watchdog = _FakeWork("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=RECV) ran for 8000 ms")
    with pytest.raises(P2PTimeoutError, match=r"rank 0 timed out after waiting up to 8s for activation 3 from rank 1"):
        wait_with_timeout(watchdog, 8, "activation 3 from rank 1", device="cuda")


def test_default_group_backend_selects_the_wait(monkeypatch):
    from merak.runtime.distributed import p2p as p2p_module

    monkeypatch.setattr(p2p_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(p2p_module.dist, "get_backend", lambda group=None: "nccl")
    assert not p2p_module.waits_on_host()
    monkeypatch.setattr(p2p_module.dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert not p2p_module.waits_on_host()
    monkeypatch.setattr(p2p_module.dist, "get_backend", lambda group=None: "gloo")
    assert p2p_module.waits_on_host()


def _two_channels() -> int:
    """Activations and gradients of differing structure alternate on one link; returns how
    many messages carried a structure description."""
    dist.init_process_group("gloo")
    p2p, sent = P2P(timeout_s=30), []
    encode = p2p._encode

    def counting(msg):
        encoded = encode(msg)
        sent.append(encoded.desc is not None)
        return encoded

    p2p._encode = counting
    for mb in range(4):
        if dist.get_rank() == 0:
            p2p.send(torch.ones(2, 3) * mb, 1, channel=("activations", 0))
            p2p.send({"grad": torch.ones(5) * mb, "aux": None}, 1, channel=("gradients", 3))
        else:
            assert torch.equal(p2p.recv(0, channel=("activations", 0)), torch.ones(2, 3) * mb)
            assert torch.equal(p2p.recv(0, channel=("gradients", 3))["grad"], torch.ones(5) * mb)
    p2p.wait_sends()
    return sum(sent)


def test_structure_is_cached_per_channel(dist_run):
    # per peer only, every message would carry its description (the two structures alternate)
    assert dist_run(_two_channels, 2)[0] == 2


def _grouped_structure_changes(mode: str, prefetched: int = 0) -> int:
    """Rank 0 sends several messages per exchange to rank 1 - two on one channel, one on
    another - while their structures change in some steps and not in others, so speculative
    payloads (posted with the headers, sized as the channel's last message), fillers and fresh
    payloads of one exchange interleave on one link. Rank 1 posts the first ``prefetched`` of
    each step's receives ahead (:meth:`P2P.prefetch`) while rank 0 is still sending the
    previous step. Returns how many messages were checked."""
    dist.init_process_group("gloo")
    p2p, checked = P2P(timeout_s=30, mode=mode), 0

    def step_messages(step: int) -> list[tuple[object, str]]:
        rows = 2 + (step // 2) % 2  # activations change shape every two steps
        act = {"h": torch.full((rows, 3), float(step)), "mask": torch.ones(rows, dtype=torch.bool)}
        grad = torch.full((4,), -float(step)) if step % 3 else (torch.zeros(0), torch.full((2, 2), 7.0 + step))
        return [(act, "a"), (grad, "g"), ({"h": act["h"] + 1, "mask": act["mask"]}, "a")]

    for step in range(7):
        expected = step_messages(step)
        if dist.get_rank() == 0:
            p2p.exchange([Outgoing(obj, 1, f"message {n}", channel) for n, (obj, channel) in enumerate(expected)])
        else:
            recvs = [Incoming(0, f"message {n}", channel) for n, (_, channel) in enumerate(expected)]
            if step == 0:
                p2p.prefetch(recvs[:prefetched])
            got = p2p.exchange(recvs=recvs)
            if step < 6:  # the next step's first receives, before this rank computes anything
                nxt = step_messages(step + 1)
                p2p.prefetch([Incoming(0, f"message {n}", channel) for n, (_, channel) in enumerate(nxt[:prefetched])])
            for (obj, _), received in zip(expected, got):
                assert_same(obj, received)
                checked += 1
    p2p.wait_sends()
    return checked


@pytest.mark.parametrize("mode, prefetched", [("native", 0), ("rendezvous", 0), ("native", 2), ("rendezvous", 3)])
def test_speculative_payloads_survive_structure_changes_within_one_exchange(dist_run, mode, prefetched):
    assert dist_run(_grouped_structure_changes, 2, mode, prefetched)[1] == 21


def _prefetch_misuse(case: str) -> None:
    dist.init_process_group("gloo")
    p2p = P2P(timeout_s=30)
    if dist.get_rank() == 0:
        p2p.send(torch.ones(2), 1, channel="a")
        p2p.wait_sends()
        return
    p2p.prefetch([Incoming(0, "the activation", "a")])
    if case == "order":
        p2p.recv(0, "the gradient", channel="g")
    else:
        p2p.wait_sends()


def test_prefetch_misuse_is_named(dist_run):
    with pytest.raises(RankFailed, match="prefetched from rank 0 is the activation .*prefetch in receive order"):
        dist_run(_prefetch_misuse, 2, "order")
    with pytest.raises(RankFailed, match=r"prefetched receives no exchange took: \['the activation'\]"):
        dist_run(_prefetch_misuse, 2, "left over")


#: Tensor methods that read a tensor's data on the host: on a CUDA tensor each is a device->host
#: synchronisation that stalls the host until the stream got there.
_HOST_READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _steady_state_traffic(mode: str, sends_with_payload: bool = False) -> list[dict]:
    """1F1B's steady state between two ranks - each sends a two-tensor message and receives the
    peer's, as one group - with the payloads on a process group of their own (the stand-in for a
    GPU job's NCCL group) and the headers on the world (its gloo host group). Per exchange:
    how many operations each group carried, and how many host reads touched a payload-group
    tensor while the exchange ran; and each payload-group batch as (sends, receives).
    ``sends_with_payload`` forces the CUDA order (payload sends in the payload round) on gloo."""
    dist.init_process_group("gloo")
    me, peer = dist.get_rank(), 1 - dist.get_rank()
    payload_group = dist.new_group(backend="gloo")
    p2p = P2P(timeout_s=30, mode=mode, payload_group=payload_group, header_group=dist.group.WORLD,
              sends_with_payload=sends_with_payload)
    on_payload_group: set[int] = set()  # storages on the payload group in this exchange
    counts: dict = {"payload_ops": 0, "header_ops": 0, "payload_reads": 0, "payload_batches": []}
    batch = dist.batch_isend_irecv

    def recording_batch(ops):
        if ops[0].group is payload_group:
            sends = sum(op.op is dist.isend for op in ops)
            counts["payload_batches"].append((sends, len(ops) - sends))
        for op in ops:
            if op.group is payload_group:
                counts["payload_ops"] += 1
                on_payload_group.add(op.tensor.untyped_storage().data_ptr())
            else:
                counts["header_ops"] += 1
        return batch(ops)

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if self.untyped_storage().data_ptr() in on_payload_group:
                counts["payload_reads"] += 1
            return original(self, *args, **kwargs)
        return original, read

    originals = {name: counting(name) for name in _HOST_READS}
    per_exchange = []
    for step in range(4):
        x = torch.full((4, 8), float(10 * me + step))
        msg = {"x": x, "mask": x > step}
        counts.update(payload_ops=0, header_ops=0, payload_reads=0, payload_batches=[])
        on_payload_group.clear()  # freed storages' addresses get reused by later tensors
        dist.batch_isend_irecv = recording_batch
        for name, (_, read) in originals.items():
            setattr(torch.Tensor, name, read)
        try:
            [got] = p2p.exchange([Outgoing(msg, peer, f"message {step}")], [Incoming(peer, f"message {step}")])
        finally:
            dist.batch_isend_irecv = batch
            for name, (original, _) in originals.items():
                setattr(torch.Tensor, name, original)
        assert torch.equal(got["x"], torch.full((4, 8), float(10 * peer + step)))
        assert torch.equal(got["mask"], got["x"] > step)
        per_exchange.append({**counts, "payload_batches": list(counts["payload_batches"])})
    p2p.wait_sends()
    return per_exchange


#: Payload-group batches (sends, receives) of one facing exchange of two-tensor messages: the host
#: order posts the payload sends with the first round, the CUDA order with the payload receives
#: (one NCCL group); ``MERAK_P2P=rendezvous`` adds an acknowledgement each way. The first
#: exchange on a channel, then every later one: on the host, once the structure is known, the
#: payload receives are posted with the header (speculative), so a steady-state exchange is one
#: round (the acknowledgement send aside).
_PAYLOAD_BATCHES = {
    ("native", False): ([(2, 0), (0, 2)], [(2, 2)]),
    ("rendezvous", False): ([(2, 1), (1, 2)], [(2, 3), (1, 0)]),
    ("native", True): ([(2, 2)], [(2, 2)]),
    ("rendezvous", True): ([(0, 1), (3, 2)], [(0, 1), (3, 2)]),
}


@pytest.mark.parametrize("mode, sends_with_payload", list(_PAYLOAD_BATCHES))
def test_steady_state_exchange_reads_nothing_from_the_payload_device(dist_run, mode, sends_with_payload):
    acks = 2 if mode == "rendezvous" else 0  # one acknowledgement each way, on the payload group
    first, steady = _PAYLOAD_BATCHES[(mode, sends_with_payload)]
    for per_exchange in dist_run(_steady_state_traffic, 2, mode, sends_with_payload):
        # first exchange: header + description each way on the host group
        assert per_exchange[0] == {"payload_ops": 4 + acks, "header_ops": 4, "payload_reads": 0,
                                   "payload_batches": first}
        # steady state: the header alone each way; the two tensors each way; no device->host read
        for counts in per_exchange[1:]:
            assert counts == {"payload_ops": 4 + acks, "header_ops": 2, "payload_reads": 0,
                              "payload_batches": steady}


def test_cuda_posts_payload_sends_with_the_payload_receives():
    # no device needed: the order is decided from the device type at construction
    assert P2P("cuda").sends_with_payload and not P2P("cpu").sends_with_payload
