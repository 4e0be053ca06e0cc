"""The distributed layer (``runtime/distributed/``) is the only caller of torch.distributed
collectives and p2p, and it puts the tensors it creates on the group's device.

* an AST scan of the package's sources fails naming ``file:line`` for any other module that
  touches a collective or p2p function of ``torch.distributed`` (called or merely referenced);
* the device rule is checked on this CPU machine by faking an NCCL backend name;
* two gloo ranks run every collective once, and a missing rank ends in an error naming the
  rank, the group and what was awaited.
"""

from __future__ import annotations

import ast
import datetime
import pathlib

import pytest
import torch
import torch.distributed as dist

from merak.runtime.distributed import collectives, groups, objects
from merak.runtime.distributed.p2p import P2PTimeoutError

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: The package's source folders (setup.cfg maps them to merak, merak.partitioner, ...).
SCANNED = ("merak", "partitioner", "runtime", "launch")
LAYER = "runtime/distributed/"

#: Temporary exemptions, each with the reason and who removes it.
ALLOWED: set[str] = set()

#: torch.distributed functions that communicate (collectives and point-to-point).
FORBIDDEN = frozenset({
    "all_reduce", "all_reduce_coalesced", "broadcast", "broadcast_object_list", "barrier",
    "monitored_barrier", "send", "recv", "isend", "irecv", "send_object_list", "recv_object_list",
    "batch_isend_irecv", "P2POp", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_gather_coalesced", "_all_gather_base", "gather", "gather_object", "scatter",
    "scatter_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
    "all_to_all", "all_to_all_single", "all_gather_tensor", "all_to_all_single_autograd",
})


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


#: Modules whose communicating functions count (the functional collectives too).
COMM_MODULES = frozenset({"torch.distributed", "torch.distributed.distributed_c10d",
                          "torch.distributed.nn.functional", "torch.distributed._functional_collectives"})


def violations(source: str, filename: str) -> list[str]:
    """``file:line: MODULE.NAME`` for every communicating use in ``source``."""
    tree = ast.parse(source, filename)
    aliases = {m: m for m in COMM_MODULES}  # a name bound to a communication module -> that module
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {(a.asname or a.name): a.name for a in node.names if a.name in COMM_MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in COMM_MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                elif node.module in COMM_MODULES and a.name in FORBIDDEN:
                    found.append(f"{filename}:{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN:
            module = aliases.get(_dotted(node.value) or "")
            if module is not None:
                found.append(f"{filename}:{node.lineno}: {module}.{node.attr}")
    return sorted(found, key=lambda v: int(v.split(":")[1]))


def test_scanner_sees_every_spelling():
    src = ("import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
           "from torch.distributed import isend\n"
           "from torch.distributed import distributed_c10d as c10d\nimport torch.distributed.nn.functional as fn\n"
           "dist.all_reduce(x)\nd2.barrier()\ntorch.distributed.broadcast(x, 0)\nf = dist.send\n"
           "c10d.all_gather(x)\nfn.all_reduce(x)\ndist.get_rank()\nobj.all_reduce(x)\n")
    assert [v.split(": ", 1)[1] for v in violations(src, "m.py")] == [
        "from torch.distributed import isend", "torch.distributed.all_reduce", "torch.distributed.barrier",
        "torch.distributed.broadcast", "torch.distributed.send", "torch.distributed.distributed_c10d.all_gather",
        "torch.distributed.nn.functional.all_reduce"]


def test_only_the_distributed_layer_calls_collectives_and_p2p():
    found = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(LAYER) or rel in ALLOWED:
                continue
            found += violations(path.read_text(), rel)
    assert not found, ("these modules call torch.distributed directly; go through "
                       "merak.runtime.distributed (collectives / objects / p2p):\n" + "\n".join(found))


# ---- the device rule, with a faked backend ------------------------------------------------
@pytest.fixture
def fake_nccl(monkeypatch):
    """A two-rank NCCL world on a machine without a GPU: only the names are faked."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def test_nccl_group_uses_the_current_cuda_device(fake_nccl):
    assert groups.device() == torch.device("cuda", 1)
    assert groups.wants_device(torch.zeros(1)) == torch.device("cuda", 1)


@pytest.mark.parametrize("backend", ["cpu:gloo,cuda:nccl", "NCCL"])
def test_mixed_or_uppercase_nccl_backend_is_cuda(fake_nccl, monkeypatch, backend):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert groups.device().type == "cuda"


def test_gloo_and_no_process_group_use_the_cpu(monkeypatch):
    assert groups.device() == torch.device("cpu")  # no process group here
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert groups.device() == torch.device("cpu")
    assert groups.wants_device(torch.zeros(1)) is None


class _Done:
    def wait(self, timeout=None):
        return True


def test_scalar_reductions_build_their_tensor_on_the_nccl_device(fake_nccl, monkeypatch):
    """reduce_values must create its tensor on cuda for NCCL (the old loss all-reduce built it
    on the host). Tensor creation is recorded and redirected to the CPU, since there is no GPU."""
    created, reduced = [], []
    real_tensor = torch.tensor

    def record(data, *args, device=None, **kwargs):
        created.append(torch.device(device) if device is not None else torch.device("cpu"))
        return real_tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", record)
    monkeypatch.setattr(groups, "wants_device", lambda t, group=None: None)  # pretend it landed there
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: (reduced.append(kw["op"]), t.mul_(2))[0] or _Done())
    assert collectives.reduce_values([1.5, 2.0], "a test loss", op="mean") == [1.5, 2.0]
    assert collectives.any_rank(True, "a test flag") is True
    assert created == [torch.device("cuda", 1)] * 2
    assert reduced == [dist.ReduceOp.SUM, dist.ReduceOp.MAX]


def test_a_collective_that_fails_to_start_is_named(fake_nccl, monkeypatch):
    """A peer already gone can make the backend raise when the collective is issued, before any
    wait: that error must name rank, group and what too."""
    def refuse(*args, **kwargs):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "barrier", refuse)
    with pytest.raises(P2PTimeoutError, match=r"rank 0 could not start the end of an epoch over the world \(2 ranks\)"):
        collectives.barrier("the end of an epoch")


def test_without_a_process_group_everything_is_local():
    t = torch.arange(4.0)
    assert collectives.all_reduce(t, "x", op="mean") is t and t.tolist() == [0, 1, 2, 3]
    assert collectives.reduce_values([3, 4], "x") == [3.0, 4.0]
    assert collectives.all_gather(t, "x")[0] is not None
    assert objects.all_gather_objects({"a": 1}, 1.0, "x") == [{"a": 1}]
    assert objects.broadcast_object("mine", 0, "x") == "mine"
    collectives.barrier("nothing to wait for")
    with pytest.raises(ValueError, match="divide after wait"):
        collectives.all_reduce_async(t, op="mean")


# ---- two gloo ranks ---------------------------------------------------------------------------
def _every_collective() -> dict:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    me = dist.get_rank()
    out: dict = {}
    out["sum"] = collectives.reduce_values([me + 1.0, 10.0], "sums")
    out["mean"] = collectives.all_reduce(torch.tensor([float(me)]), "a mean", op="mean").tolist()
    out["max"] = collectives.reduce_values([float(me)], "a max", op="max")
    out["any"] = collectives.any_rank(me == 1, "a flag")
    out["bcast"] = collectives.broadcast(torch.full((2,), float(me)), 1, "a broadcast").tolist()
    out["obj"] = objects.broadcast_object({"from": me} if me == 0 else None, 0, "an object")
    out["objs"] = objects.all_gather_objects([me] * (me + 1), 30, "lists of different lengths")
    out["rs"] = collectives.reduce_scatter(torch.arange(4.0) * (me + 1), "a reduce-scatter").tolist()
    out["a2a"] = collectives.all_to_all_single(torch.tensor([[me * 10.0], [me * 10.0 + 1], [me * 10.0 + 2]]),
                                               [1, 2] if me == 0 else [2, 1], [1, 2] if me == 0 else [2, 1],
                                               "an all-to-all").flatten().tolist()
    parts = collectives.gather(torch.tensor([float(me)]), "a gather")
    out["gather"] = None if parts is None else [float(p) for p in parts]
    collectives.barrier("the end of the test")
    return out


def test_every_collective_on_two_gloo_ranks(dist_run):
    r0, r1 = dist_run(_every_collective, 2, timeout=90)
    for r in (r0, r1):
        assert r["sum"] == [3.0, 20.0] and r["mean"] == [0.5] and r["max"] == [1.0] and r["any"] is True
        assert r["bcast"] == [1.0, 1.0] and r["obj"] == {"from": 0} and r["objs"] == [[0], [1, 1]]
    assert r0["rs"] == [0.0, 3.0] and r1["rs"] == [6.0, 9.0]
    assert r0["a2a"] == [0.0, 10.0, 11.0] and r1["a2a"] == [1.0, 2.0, 12.0]
    assert r0["gather"] == [0.0, 1.0] and r1["gather"] is None


def _missing_peer() -> str:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    if dist.get_rank() == 1:
        return ""  # never joins the all-reduce below (the harness tears its process group down)
    try:
        collectives.reduce_values([1.0], "the step's loss", timeout_s=1)
    except P2PTimeoutError as exc:
        return str(exc)
    return "no error"


def test_a_missing_rank_is_named_with_group_and_what(dist_run):
    message = dist_run(_missing_peer, 2, timeout=60)[0]
    assert "rank 0" in message and "the step's loss" in message and "the world (2 ranks)" in message


def test_an_accelerator_job_gets_a_host_group_for_control_messages(fake_nccl, monkeypatch):
    made = []
    monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or "the gloo group")
    timeout = datetime.timedelta(seconds=7)
    assert groups.new_host_group(timeout) == "the gloo group"
    assert made == [{"backend": "gloo", "timeout": timeout}]
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert groups.new_host_group(timeout) is None and len(made) == 1  # gloo already is the host
