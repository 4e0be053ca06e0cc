"""Tensor-parallel building blocks: the communication functions and the sharded layers.

Megatron-style TP needs four communication patterns, each an autograd function so that forward
and backward stay exact:

==================  ===============================  ===================================
function            forward                          backward
==================  ===============================  ===================================
``copy``  (f)       identity                         all-reduce the input gradient
``reduce`` (g)      all-reduce (sum of partials)     identity
``scatter``         keep this rank's chunk of a dim  all-gather the gradient chunks
``vocab CE``        3 small all-reduces (max, sum    local softmax minus one-hot, no comm
                    of exp, target logit)
==================  ===============================  ===================================

A column-parallel layer reads its input through ``copy`` (one per input value, however many
column layers share it: q, k and v, or gate and up, cost one backward all-reduce together), a
row-parallel layer ends in ``reduce`` and adds its (replicated) bias after it. ``scatter`` lets a
replicated tensor meet a sharded one (T5's position bias, K/V heads replicated because there
are fewer of them than ranks).

Every function exists in a *blocking* form (used when ``tp_sub_microbatches == 1``) and a
*split* form (:class:`AsyncForward` / :class:`GradPair`) that launches the collective and waits
for it later, which is what sub-micro-batch interleaving needs (see :mod:`.tp_interleave`).

Layers keep the parameter names of the modules they replace (``weight``, ``bias``), so stage
state dicts, checkpoints and optimizers see the names they know; only shapes are local.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from merak.runtime.distributed import collectives
from merak.runtime.distributed.collectives import ReduceOpName

__all__ = [
    "TPGroup",
    "ShardSpec",
    "copy_to_tp",
    "reduce_from_tp",
    "scatter_to_tp",
    "vocab_parallel_cross_entropy",
    "CopyToTP",
    "ScatterToTP",
    "VocabParallelCrossEntropy",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ForwardReduceLayer",
    "ReduceFromTP",
    "VocabShardLookup",
    "vocab_shard_lookup",
    "AsyncForward",
    "GradPair",
]


# ---- the group --------------------------------------------------------------------------------
@dataclasses.dataclass
class TPGroup:
    """This rank's tensor-parallel group: ``rank`` in ``0..size-1`` and the process group.

    ``group=None`` with ``size > 1`` is allowed only for planning (no collective may run).
    Collectives wait at most ``timeout_s`` and then raise naming what was awaited.
    """

    group: Any
    rank: int
    size: int
    timeout_s: float = 300.0

    def __deepcopy__(self, memo: dict[int, Any]) -> "TPGroup":
        return self  # a process group is shared state, never copied (StageModule deepcopy)

    def all_reduce(self, t: torch.Tensor, what: str, op: ReduceOpName = "sum") -> None:
        """In-place blocking all-reduce (sum unless ``op``)."""
        if self.size > 1:
            self.wait(self.all_reduce_async(t, op), what)

    def all_reduce_async(self, t: torch.Tensor, op: ReduceOpName = "sum") -> Any:
        return collectives.all_reduce_async(t, op=op, group=self.group)

    def all_gather_async(self, t: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
        return collectives.all_gather_async(t, group=self.group)

    def wait(self, work: Any, what: str) -> None:
        collectives.wait(work, f"the tensor-parallel {what}", group=self.group, timeout_s=self.timeout_s)

    def chunk(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous chunk of ``t`` along ``dim``."""
        size = t.shape[dim]
        if size % self.size:
            raise ValueError(f"dimension {dim} of size {size} cannot be split over tp={self.size}")
        step = size // self.size
        return t.narrow(dim, self.rank * step, step).contiguous()


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How one parameter is sharded: along ``dim`` into ``parts`` chunks, per block.

    ``blocks`` are the full sizes of consecutive blocks along ``dim`` that are sharded
    separately (GPT-2's fused ``c_attn`` output is three blocks q, k, v: each rank keeps its chunk
    of each). An empty tuple means one block of the whole dimension.
    """

    dim: int
    parts: int
    blocks: tuple[int, ...] = ()

    def local(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """The shard of ``full`` held by ``rank``."""
        blocks = self.blocks or (full.shape[self.dim],)
        if sum(blocks) != full.shape[self.dim]:
            raise ValueError(f"blocks {blocks} do not add up to dimension {self.dim} of shape {tuple(full.shape)}")
        pieces = []
        for block in full.split(list(blocks), dim=self.dim):
            step = block.shape[self.dim] // self.parts
            pieces.append(block.narrow(self.dim, rank * step, step))
        return torch.cat(pieces, dim=self.dim).contiguous()

    def full(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`local`: the full tensor from every rank's shard (in rank order)."""
        if len(shards) != self.parts:
            raise ValueError(f"expected {self.parts} shards, got {len(shards)}")
        local_blocks = [b // self.parts for b in self.blocks] if self.blocks else [shards[0].shape[self.dim]]
        per_rank = [s.split(local_blocks, dim=self.dim) for s in shards]
        return torch.cat([torch.cat([parts[b] for parts in per_rank], dim=self.dim)
                          for b in range(len(local_blocks))], dim=self.dim)


# ---- blocking autograd functions ----------------------------------------------------------------
class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tpg):  # type: ignore[override]
        ctx.tpg = tpg
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous().clone()
        ctx.tpg.all_reduce(grad, "all-reduce of an input gradient (copy to the TP region)")
        return grad, None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tpg):  # type: ignore[override]
        out = x.contiguous().clone()
        tpg.all_reduce(out, "all-reduce of a row-parallel output")
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, tpg):  # type: ignore[override]
        ctx.tpg, ctx.dim = tpg, dim
        return tpg.chunk(x, dim)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        work, parts = ctx.tpg.all_gather_async(grad)
        ctx.tpg.wait(work, "all-gather of a scattered gradient")
        return torch.cat(parts, dim=ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, tpg: TPGroup) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient in backward (Megatron's *f*)."""
    return _Copy.apply(x, tpg) if tpg.size > 1 and torch.is_grad_enabled() else x


def reduce_from_tp(x: torch.Tensor, tpg: TPGroup) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward (Megatron's *g*)."""
    if tpg.size == 1:
        return x
    return _Reduce.apply(x, tpg)


def scatter_to_tp(x: torch.Tensor, dim: int, tpg: TPGroup) -> torch.Tensor:
    """This rank's chunk of a replicated tensor along ``dim``; backward all-gathers."""
    if tpg.size == 1:
        return x
    if not (torch.is_grad_enabled() and x.requires_grad):
        return tpg.chunk(x, dim)
    return _Scatter.apply(x, dim, tpg)


# ---- split (asynchronous) forms for sub-micro-batch interleaving ---------------------------------
class _Box:
    """Hands a pending collective from the op that starts it to the op that finishes it."""

    __slots__ = ("work", "parts", "result")

    def __init__(self) -> None:
        self.work: Any = None
        self.parts: list[torch.Tensor] | None = None
        self.result: torch.Tensor | None = None


class _LaunchReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, box, tpg):  # type: ignore[override]
        out = x.contiguous().clone()
        box.work = tpg.all_reduce_async(out)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None


class AsyncForward:
    """A forward all-reduce split in two: :meth:`start` launches it, :meth:`finish` waits.

    The tensor returned by ``start`` is filled in place by the collective; nothing may read it
    before ``finish`` returns (the sub-micro-batch runner guarantees that).
    """

    def __init__(self, tpg: TPGroup) -> None:
        self.tpg, self.box = tpg, _Box()

    def start(self, partial: torch.Tensor) -> torch.Tensor:
        return _LaunchReduce.apply(partial, self.box, self.tpg)

    def finish(self, pending: torch.Tensor) -> torch.Tensor:
        self.tpg.wait(self.box.work, "all-reduce of a row-parallel output (sub-micro-batch)")
        return pending


class _GradWait(torch.autograd.Function):
    """Identity forward. In backward (which runs *after* :class:`_GradLaunch`'s) waits for the
    collective that the launch started and returns its result."""

    @staticmethod
    def forward(ctx, x, box, what, tpg):  # type: ignore[override]
        ctx.box, ctx.what, ctx.tpg = box, what, tpg
        return x.view_as(x)

    @staticmethod
    def backward(ctx, _unused):  # type: ignore[override]
        box = ctx.box
        ctx.tpg.wait(box.work, ctx.what)
        result = box.result if box.parts is None else torch.cat(box.parts, dim=box.result)
        box.work = box.parts = box.result = None
        return result, None, None, None


class _GradLaunch(torch.autograd.Function):
    """Forward: identity (``copy``) or this rank's chunk (``scatter``). Backward: launch the
    all-reduce / all-gather of the gradient and return at once (the paired wait finishes it)."""

    @staticmethod
    def forward(ctx, x, box, dim, tpg):  # type: ignore[override]
        ctx.box, ctx.dim, ctx.tpg, ctx.full_shape = box, dim, tpg, x.shape
        return x.view_as(x) if dim is None else tpg.chunk(x, dim)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        box = ctx.box
        if ctx.dim is None:
            box.result = grad.contiguous().clone()
            box.work = ctx.tpg.all_reduce_async(box.result)
        else:
            box.work, box.parts = ctx.tpg.all_gather_async(grad)
            box.result = ctx.dim  # type: ignore[assignment]  # the dim to concatenate on
        # A placeholder for the gradient of the wait op's output, which ignores it.
        return grad.new_zeros(()).expand(ctx.full_shape), None, None, None


class GradPair:
    """A backward collective split in two autograd nodes, so that autograd can run other work
    between launching and waiting.

    ``wait_op(x)`` must be applied at the end of one segment and ``launch_op(...)`` at the start
    of the next: autograd runs later-created nodes first, so in backward the launch runs, then
    the other sub-micro-batches' backward of that segment, then the wait.
    """

    def __init__(self, tpg: TPGroup, dim: int | None) -> None:
        self.tpg, self.dim, self.box = tpg, dim, _Box()
        self.what = ("all-reduce of an input gradient" if dim is None else "all-gather of a scattered gradient") \
            + " (sub-micro-batch)"

    def wait_op(self, x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None or not (torch.is_grad_enabled() and x.requires_grad):
            return x
        return _GradWait.apply(x, self.box, self.what, self.tpg)

    def launch_op(self, x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x if self.dim is None else self.tpg.chunk(x, self.dim)
        return _GradLaunch.apply(x, self.box, self.dim, self.tpg)


# ---- graph-callable communication modules -------------------------------------------------------
class _TPModule(nn.Module):
    """A parameter-free module bound to the TP group (so fx graphs can call it by name)."""

    def __init__(self, tpg: TPGroup) -> None:
        super().__init__()
        self.tpg = tpg

    def __deepcopy__(self, memo: dict[int, Any]) -> "_TPModule":
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update({k: (v if k == "tpg" else _deepcopy(v, memo)) for k, v in self.__dict__.items()})
        return new


def _deepcopy(value: Any, memo: dict[int, Any]) -> Any:
    return copy.deepcopy(value, memo)


class CopyToTP(_TPModule):
    """``y = copy_to_tp(x)``: where a replicated value enters a tensor-parallel region."""

    def forward(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else copy_to_tp(x, self.tpg)

    def pair(self, dim: None = None) -> GradPair:
        return GradPair(self.tpg, None)


class ScatterToTP(_TPModule):
    """``y = scatter_to_tp(x, dim)``: this rank's part of a replicated value that meets a sharded one."""

    def forward(self, x: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        # None: an optional input a graph rewrite dropped (SDPA's mask once found causal)
        return None if x is None else scatter_to_tp(x, dim, self.tpg)

    def pair(self, dim: int) -> GradPair:
        return GradPair(self.tpg, dim)


# ---- vocab-parallel cross-entropy ---------------------------------------------------------------
class _VocabCrossEntropy(torch.autograd.Function):
    """Per-row losses of logits split over the class dimension (last dim); no full logits."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, tpg):  # type: ignore[override]
        local = logits.shape[-1]
        start = tpg.rank * local
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 -> fp32
        row_max = logits.max(dim=-1).values
        tpg.all_reduce(row_max, "max of the logits (vocab-parallel cross-entropy)", op="max")
        shifted = logits - row_max.unsqueeze(-1)
        ignored = target == ignore_index
        mine = (target >= start) & (target < start + local) & ~ignored
        index = torch.where(mine, target - start, torch.zeros_like(target))
        picked = shifted.gather(-1, index.unsqueeze(-1)).squeeze(-1) * mine
        exp = shifted.exp()
        stats = torch.stack([exp.sum(dim=-1), picked])
        tpg.all_reduce(stats, "sum of exp-logits and target logits (vocab-parallel cross-entropy)")
        sum_exp, target_logit = stats[0], stats[1]
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax of the local columns, kept for backward
        ctx.save_for_backward(exp, index, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        softmax, index, mine, ignored = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, index.unsqueeze(-1), -mine.to(grad.dtype).unsqueeze(-1))
        scale = grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad * scale, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tpg: TPGroup,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy`` for logits sharded over classes (dim 1 of ``(N, C_local)``, or the
    last dim when ``logits`` has one dim more than ``target``).

    Equal to the single-process value up to rounding; ``reduction="mean"`` divides by the
    number of targets that are not ``ignore_index`` (NaN when there is none, as torch does).
    """
    if logits.dim() == target.dim() + 1 and logits.dim() > 2:
        logits = logits.movedim(1, -1)  # (N, C, d1..) -> (N, d1.., C), torch's class dim is 1
    losses = _VocabCrossEntropy.apply(logits, target, ignore_index, tpg)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / (target != ignore_index).sum()
    raise ValueError(f"reduction={reduction!r}: vocab-parallel cross-entropy supports mean, sum and none")


class VocabParallelCrossEntropy(_TPModule):
    """Graph-callable :func:`vocab_parallel_cross_entropy` (replaces ``F.cross_entropy``)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                reduction: str = "mean") -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, target, self.tpg, ignore_index, reduction)


# ---- sharded layers -------------------------------------------------------------------------------
class ForwardReduceLayer(nn.Module):
    """A layer whose forward ends in an all-reduce: ``forward = finish(reduce(partial(x)))``.

    The sub-micro-batch runner calls :meth:`partial`, overlaps the all-reduce with other work,
    then :meth:`finish`.
    """

    tpg: TPGroup
    tp_spec: dict[str, ShardSpec]

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(reduce_from_tp(self.partial(x), self.tpg))

    def __deepcopy__(self, memo: dict[int, Any]) -> "ForwardReduceLayer":
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({k: (v if k == "tpg" else _deepcopy(v, memo)) for k, v in self.__dict__.items()})
        return new


class ReduceFromTP(ForwardReduceLayer):
    """``y = reduce_from_tp(x)`` as a graph-callable layer: the all-reduce that ends a row-parallel
    op applied functionally (``aten.linear`` in an export graph; its bias is added after it).
    A :class:`ForwardReduceLayer`, so the sub-micro-batch runner overlaps it like the others."""

    def __init__(self, tpg: TPGroup) -> None:
        super().__init__()
        self.tpg = tpg
        self.tp_spec = {}

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return x


class RowParallelLinear(ForwardReduceLayer):
    """A linear layer with its input features split over the TP ranks: each rank multiplies its
    slice, the partial sums are all-reduced, then the replicated bias is added once.

    ``nn.Linear`` layout (weight ``(out, in)``), or Hugging Face ``Conv1D`` with
    ``transposed=True`` (``y = x @ W + b``, weight ``(in, out)``).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, tpg: TPGroup, spec: ShardSpec,
                 transposed: bool = False) -> None:
        super().__init__()
        self.weight, self.bias, self.tpg, self.transposed = weight, bias, tpg, transposed
        self.tp_spec = {"weight": spec}
        self.in_features, self.out_features = weight.shape[::-1] if not transposed else weight.shape

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) if self.transposed else F.linear(x, self.weight)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local), out_features={self.out_features}, tp={self.tpg.size}"
                + (", Conv1D layout" if self.transposed else ""))


def vocab_shard_lookup(weight: torch.Tensor, ids: torch.Tensor, vocab_start: int,
                       local_padding_idx: int | None = None) -> torch.Tensor:
    """This rank's part of an embedding lookup: rows of ``weight`` (vocabulary rows
    ``vocab_start ..``) for the ids it owns, zeros for the others (the all-reduce adds them up)."""
    outside = (ids < vocab_start) | (ids >= vocab_start + weight.shape[0])
    local = torch.where(outside, torch.zeros_like(ids), ids - vocab_start)
    out = F.embedding(local, weight, local_padding_idx)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


class VocabShardLookup(_TPModule):
    """Graph-callable :func:`vocab_shard_lookup` for a functional embedding (``F.embedding`` /
    ``aten.embedding`` on a vocab-sharded parameter); ``padding_idx`` is a full-vocabulary id.
    The graph follows it with :class:`ReduceFromTP`."""

    def forward(self, weight: torch.Tensor, ids: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
        start = self.tpg.rank * weight.shape[0]
        inside = padding_idx is not None and start <= padding_idx < start + weight.shape[0]
        return vocab_shard_lookup(weight, ids, start, padding_idx - start if inside else None)


class VocabParallelEmbedding(ForwardReduceLayer):
    """``nn.Embedding`` with its rows (the vocabulary) split: a rank looks up the ids it owns,
    writes zeros for the others, and the all-reduce assembles every row."""

    def __init__(self, source: nn.Embedding, weight: nn.Parameter, tpg: TPGroup, spec: ShardSpec) -> None:
        super().__init__()
        self.weight, self.tpg = weight, tpg
        self.tp_spec = {"weight": spec}
        self.num_embeddings, self.embedding_dim = source.num_embeddings, source.embedding_dim
        self.local_rows = weight.shape[0]
        self.vocab_start = tpg.rank * self.local_rows
        pad = source.padding_idx
        inside = pad is not None and self.vocab_start <= pad < self.vocab_start + self.local_rows
        self.padding_idx = pad - self.vocab_start if inside else None
        for option in ("max_norm", "scale_grad_by_freq", "sparse"):
            if getattr(source, option, None):
                raise ValueError(f"vocab-parallel embedding does not support {option}={getattr(source, option)}; "
                                 f"map this embedding to 'replicate' in tp_mapping")

    def partial(self, ids: torch.Tensor) -> torch.Tensor:
        return vocab_shard_lookup(self.weight, ids, self.vocab_start, self.padding_idx)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows {self.vocab_start}.."
                f"{self.vocab_start + self.local_rows - 1} on this rank, tp={self.tpg.size}")
