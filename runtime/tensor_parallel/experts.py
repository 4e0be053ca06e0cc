"""Mixture-of-experts under tensor parallelism: the router replicated, the experts sharded.

A transformers MoE layer is a *router* (a plain linear layer + softmax + top-k, traced into the
graph and kept replicated: its softmax runs over the experts, which no TP rank may split) and an
*expert bank* (every expert's weights stacked in 3-D parameters, kept as one opaque graph node by
the tracer, see :func:`merak.partitioner.tracer.is_expert_bank`). The bank is called as
``experts(hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K))`` and returns ``(T, H)``.
Its inputs and output are replicated over the TP group, so the bank can be replaced by a module
with the same call signature in one of two ways (``MerakArguments.moe_parallel``):

``tensor`` -- tensor parallelism inside each expert (Megatron's TP for experts)
    each rank keeps ``1/tp`` of every expert's intermediate features: ``gate_up_proj`` split per
    block (gate | up), ``down_proj`` split on its input features. The bank's own forward runs on
    the local shards and yields a partial sum, all-reduced once (``reduce``); the hidden states
    and the routing weights enter through ``copy`` (their gradients are partial per rank).

``expert`` -- expert parallelism (Megatron-core's all-to-all token dispatcher)
    each rank keeps ``num_experts / tp`` whole experts. Each rank takes its ``1/tp`` slice of the
    tokens, sends every (token, chosen expert) pair to the rank owning that expert with one
    all-to-all, runs its local experts on what it received, sends the results back with a second
    all-to-all, weights and sums them per token, and the slices are all-gathered so the output
    is replicated again. Every token is computed once, by its experts' owner; biases, interleaved
    gate/up layouts and per-expert norms work unchanged because whole experts stay together.

Auxiliary (load-balancing) losses are computed by the model from the replicated router logits,
so they are untouched by either mode. Parameters keep their names and record a
:class:`~merak.runtime.tensor_parallel.layers.ShardSpec` (per-expert split, or dim 0 for whole
experts), so checkpoints, export and the gradient norm treat them like any sharded weight.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from merak.partitioner.tracer import is_expert_bank
from merak.runtime.distributed import collectives
from merak.runtime.tensor_parallel.layers import ShardSpec, TPGroup, copy_to_tp, reduce_from_tp, scatter_to_tp
from merak.runtime.tensor_parallel.plan import TPError

__all__ = ["MOE_MODES", "ExpertPlan", "plan_expert_bank", "shard_expert_bank", "TensorParallelExperts",
           "ExpertParallelExperts", "all_to_all", "gather_from_tp"]

#: ``MerakArguments.moe_parallel`` values
MOE_MODES = ("tensor", "expert")


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """How one expert bank (by qualified module name) is sharded.

    ``mode``: ``tensor`` or ``expert`` (see the module docstring); ``specs``: parameter name ->
    :class:`ShardSpec`; ``intermediate``: each expert's intermediate features (full); ``top_k``:
    experts per token.
    """

    module: str
    mode: str
    num_experts: int
    hidden: int
    intermediate: int
    top_k: int
    specs: dict[str, ShardSpec]
    node: str = ""  # the graph node that calls the bank

    def describe(self, tp: int) -> str:
        if self.mode == "expert":
            return f"experts {self.num_experts} -> {self.num_experts // tp} per rank (all-to-all)"
        return f"expert ffn {self.intermediate} -> {self.intermediate // tp}"


def _layout(bank: nn.Module) -> tuple[str, bool, bool, bool, bool]:
    """(up parameter name, has gate, transposed, concatenated gate|up, post-expert norm)."""
    gate = "gate_up_proj" in bank._parameters
    up_name = "gate_up_proj" if gate else "up_proj"
    transposed = getattr(bank, "is_transposed", None)
    if transposed is None:  # a bank without transformers' experts decorator (Llama4): read the shapes
        up, down = bank._parameters[up_name], bank._parameters["down_proj"]
        transposed = up.shape[1] == down.shape[2] and up.shape[2] != down.shape[1]  # (E, H, 2I), (E, I, H)
    return (up_name, gate, bool(transposed), bool(getattr(bank, "is_concatenated", True)),
            bool(getattr(bank, "has_post_expert_norm", False)))


def plan_expert_bank(bank: nn.Module, name: str, tp: int, mode: str, top_k: int) -> ExpertPlan:
    """The plan for one expert bank; :class:`TPError` naming the module and the fix when ``mode``
    cannot shard it for ``tp`` ranks."""
    if mode not in MOE_MODES:
        raise TPError(f"moe_parallel={mode!r} must be one of {', '.join(MOE_MODES)}")
    if not is_expert_bank(bank):
        raise TPError(f"{name} ({type(bank).__name__}) is not an expert bank (3-D gate_up_proj/up_proj and down_proj)")
    experts = bank.num_experts
    up_name, gate, transposed, concatenated, post_norm = _layout(bank)
    down = bank._parameters["down_proj"]
    hidden, inter = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
    fix = (f"set moe_parallel='{'expert' if mode == 'tensor' else 'tensor'}' or keep the experts replicated "
           f"with tp_mapping '{name}=replicate'")
    # Sharding covers the bank's own stacked weights only. A submodule with weights of its own runs
    # inside the bank's forward (Ergo's per-expert post_expert_norm): in tensor mode it would see
    # partial sums, in expert mode it would index all experts' rows with local expert ids.
    inner = sorted(child for child, sub in bank.named_children() if next(sub.parameters(), None) is not None)
    if inner:
        raise TPError(f"{name} ({type(bank).__name__}) runs submodules with weights of their own inside its forward "
                      f"({', '.join(inner)}), which neither MoE mode shards; keep the experts replicated with "
                      f"tp_mapping '{name}=replicate'")
    if mode == "expert":
        try:
            params = inspect.signature(bank.forward).parameters.values()
            routed = len(params) >= 3 or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
        except (TypeError, ValueError):
            routed = True
        if not routed:
            raise TPError(f"expert parallelism needs {name} ({type(bank).__name__}) to be called with "
                          f"(hidden_states, top_k_index, top_k_weights); its forward takes tokens already routed to "
                          f"every expert; {fix}")
        if experts % tp:
            raise TPError(f"expert parallelism over tp={tp} ranks needs the number of experts of {name} "
                          f"({experts}) to be divisible by {tp}; {fix}")
        specs = {n: ShardSpec(0, tp) for n, p in bank._parameters.items()
                 if p is not None and p.dim() >= 1 and p.shape[0] == experts}
        return ExpertPlan(name, mode, experts, hidden, inter, top_k, specs)
    blockers = [why for why, bad in (
        ("its gate and up projections are interleaved (is_concatenated=False)", gate and not concatenated),
        ("a norm follows each expert (has_post_expert_norm)", post_norm),
        ("down_proj has a bias, which a partial sum would add once per rank", "down_proj_bias" in bank._parameters),
    ) if bad]
    if blockers:
        raise TPError(f"tensor parallelism inside the experts of {name} ({type(bank).__name__}) is impossible: "
                      f"{'; '.join(blockers)}; {fix}")
    if inter % tp:
        raise TPError(f"the experts' intermediate size {inter} of {name} is not divisible by tp={tp}; {fix}")
    blocks = (inter, inter) if gate else ()
    up_dim, down_dim = (2, 1) if transposed else (1, 2)
    specs = {up_name: ShardSpec(up_dim, tp, blocks), "down_proj": ShardSpec(down_dim, tp)}
    up_bias = f"{up_name}_bias"
    if up_bias in bank._parameters:
        specs[up_bias] = ShardSpec(1, tp, blocks)
    return ExpertPlan(name, mode, experts, hidden, inter, top_k, specs)


# ---- communication ----------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split by ``send`` go to each rank; ``recv`` rows come back. Backward: the
    reverse exchange of the gradient rows."""

    @staticmethod
    def forward(ctx, x, send, recv, tpg):  # type: ignore[override]
        ctx.send, ctx.recv, ctx.tpg = send, recv, tpg
        return _exchange(x, send, recv, tpg, "all-to-all of expert tokens")

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _exchange(grad, ctx.recv, ctx.send, ctx.tpg, "all-to-all of expert token gradients"), None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], tpg: TPGroup, what: str) -> torch.Tensor:
    return collectives.all_to_all_single(x, send, recv, f"the tensor-parallel {what}", group=tpg.group,
                                         timeout_s=tpg.timeout_s)


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], tpg: TPGroup) -> torch.Tensor:
    """Send ``send[r]`` consecutive rows of ``x`` to rank ``r`` and receive ``recv[r]`` from it."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllToAll.apply(x, send, recv, tpg)
    return _exchange(x, send, recv, tpg, "all-to-all of expert tokens")


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, tpg):  # type: ignore[override]
        ctx.dim, ctx.tpg = dim, tpg
        work, parts = tpg.all_gather_async(x)
        tpg.wait(work, "all-gather of expert outputs")
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return ctx.tpg.chunk(grad, ctx.dim), None, None  # every rank holds the same (replicated) gradient


def gather_from_tp(x: torch.Tensor, dim: int, tpg: TPGroup) -> torch.Tensor:
    """All-gather the ranks' chunks along ``dim`` (inverse of ``scatter``); backward keeps this
    rank's chunk of the replicated gradient."""
    if tpg.size == 1:
        return x
    return _Gather.apply(x, dim, tpg)


# ---- the sharded banks ---------------------------------------------------------------------------
class _ShardedBank(nn.Module):
    """Owns the bank's (sharded) parameters under their original names and runs the bank's own
    forward on them (``_bank``: a shallow copy of the user's module, not a registered child, so
    parameter names stay ``...experts.gate_up_proj``)."""

    def __init__(self, bank: nn.Module, params: dict[str, nn.Parameter], plan: ExpertPlan, tpg: TPGroup) -> None:
        super().__init__()
        inner = copy.copy(bank)
        inner._parameters = dict(bank._parameters)
        inner._buffers = dict(bank._buffers)
        inner._modules = dict(bank._modules)
        for name, param in params.items():
            inner._parameters[name] = param
            self._parameters[name] = param
        for name, param in bank._parameters.items():
            if name not in params and param is not None:
                self._parameters[name] = param
        object.__setattr__(self, "_bank", inner)
        self.plan, self.tpg = plan, tpg
        self.tp_spec = dict(plan.specs)

    def __deepcopy__(self, memo: dict[int, Any]) -> "_ShardedBank":
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update({k: (v if k == "tpg" else copy.deepcopy(v, memo)) for k, v in self.__dict__.items()})
        return new

    def extra_repr(self) -> str:
        return f"{type(self._bank).__name__}: {self.plan.describe(self.tpg.size)}"


class TensorParallelExperts(_ShardedBank):
    """Every expert's intermediate features split over the TP group; one all-reduce per call."""

    def __init__(self, bank: nn.Module, params: dict[str, nn.Parameter], plan: ExpertPlan, tpg: TPGroup) -> None:
        super().__init__(bank, params, plan, tpg)
        if hasattr(self._bank, "intermediate_dim"):
            self._bank.intermediate_dim = plan.intermediate // tpg.size

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # any call signature: (hidden, top_k_index, top_k_weights), or Llama4's pre-routed (hidden,);
        # every floating input enters through ``copy`` (its gradient is a partial sum per rank)
        def enter(x: Any) -> Any:
            return copy_to_tp(x, self.tpg) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        partial = self._bank(*map(enter, args), **{k: enter(v) for k, v in kwargs.items()})
        return reduce_from_tp(partial, self.tpg)


class ExpertParallelExperts(_ShardedBank):
    """``num_experts / tp`` whole experts per rank; tokens exchanged with two all-to-alls."""

    def __init__(self, bank: nn.Module, params: dict[str, nn.Parameter], plan: ExpertPlan, tpg: TPGroup) -> None:
        super().__init__(bank, params, plan, tpg)
        self.local_experts = plan.num_experts // tpg.size
        self._bank.num_experts = self.local_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        tpg, local = self.tpg, self.local_experts
        tokens = hidden_states.shape[0]
        if tokens % tpg.size:
            raise TPError(f"expert parallelism over tp={tpg.size} ranks splits the {tokens} tokens of a micro-batch "
                          f"evenly; make micro-batch size x sequence length divisible by {tpg.size}")
        mine = scatter_to_tp(hidden_states, 0, tpg)  # (T/tp, H): this rank dispatches these tokens
        weights = scatter_to_tp(top_k_weights, 0, tpg).reshape(-1)
        experts = tpg.chunk(top_k_index, 0).reshape(-1)  # one entry per (token, choice)
        token = torch.arange(mine.shape[0], device=mine.device).repeat_interleave(top_k_index.shape[1])
        owner = torch.div(experts, local, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=tpg.size)
        recv_counts = _exchange(send_counts, [1] * tpg.size, [1] * tpg.size, tpg, "all-to-all of expert token counts")
        send, recv = send_counts.tolist(), recv_counts.tolist()
        rows = all_to_all(mine[token[order]], send, recv, tpg)
        ids = _exchange((experts[order] % local).contiguous(), send, recv, tpg, "all-to-all of expert ids")
        done = self._bank(rows, ids[:, None], torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device))
        back = all_to_all(done, recv, send, tpg) * weights[order, None].to(done.dtype)
        out = torch.zeros_like(mine).index_add(0, token[order], back.to(mine.dtype))
        return gather_from_tp(out, 0, tpg)


def shard_expert_bank(bank: nn.Module, plan: ExpertPlan, tpg: TPGroup,
                      shard: Any) -> nn.Module:
    """The replacement of ``bank``: its parameters sharded by ``shard(param, spec)`` (which keeps
    ties) and its forward wrapped for ``plan.mode``."""
    params = {name: shard(bank._parameters[name], spec) for name, spec in plan.specs.items()}
    cls = ExpertParallelExperts if plan.mode == "expert" else TensorParallelExperts
    return cls(bank, params, plan, tpg)
