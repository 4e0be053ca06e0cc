"""Traced causal masks become ``is_causal=True`` on ``scaled_dot_product_attention``.

Why: run eagerly, a Hugging Face decoder hands SDPA no mask at all - it sees that the mask would
be purely causal and passes ``is_causal=True``, so the kernel skips the masked half of the score
matrix and reads no mask. Under tracing that shortcut is off (the model cannot tell a proxy's
values), so the traced graph *builds* the causal mask from ``arange`` / ``cumsum`` / comparisons
every micro-batch and hands SDPA an explicit ``[b, 1, s, s]`` mask. On the CPU throughput
benchmark (GPT-2, sequence 128) the masked kernel costs ~35 % more per attention call forward
and backward, ~3 % of a whole training step; on GPUs an explicit mask also rules out the flash
kernels. Peers that call the decoder blocks themselves (DeepSpeed's ``PipelineModule``) get the
fast path for free; a traced stage needs this rewrite to match.

When the rewrite is safe: the mask must be a function of *shapes only* - every path from a batch
input, parameter or module output to the mask passes through a ``.shape`` / ``.size()`` /
``.device`` / ``.dtype`` query (on a later stage: a ``torch.Size`` received from the previous
stage), and no op on the way draws random numbers or is mutated in place
by an op outside that sub-graph. Such a mask is the same for every micro-batch of one shape.
It is not proven causal from its ops (Hugging Face builds it through several layers of mask
functions, packed-sequence detection included); instead the stage computes it once per distinct
shape and *checks the values*: a ``[..., n, n]`` mask with ``n >= 2`` that is exactly the lower
triangle (bool ``True`` / float ``0`` on and below the diagonal, ``False`` / ``-inf`` or the dtype's
minimum above it) is replaced by ``is_causal=True``; any other mask (sliding window, a shape where
it is not causal) is passed to SDPA as before. So the rewrite never changes a result, and a mask
that depends on the batch (padding) is never touched. The cache holds a few shapes (LRU).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .proxy_graph import _is_random, mutated_input, _target_name

__all__ = ["ShapeKeyedMask", "is_causal_mask", "rewrite_causal_attention"]

#: Tensor attributes that depend on a tensor's shape, device and dtype, never on its values.
_SHAPE_ATTRIBUTES = frozenset({"shape", "device", "dtype", "ndim", "is_cuda"})
_SHAPE_METHODS = frozenset({"size", "dim"})
#: Besides random ops: op names whose result is not a function of their inputs (uninitialized memory).
_UNINITIALIZED = ("empty",)
#: SDPA as fx tracing records it and as torch.export records it (same argument positions).
_SDPA_TARGETS = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_SIZE_OPS = (torch.ops.aten.sym_size.int,)  # torch.export's ``x.shape[d]``
_SDPA_MASK_POSITION, _SDPA_CAUSAL_POSITION = 3, 5


def is_causal_mask(mask: Any) -> bool:
    """Whether SDPA with ``mask`` computes exactly what ``is_causal=True`` computes.

    ``n >= 2`` is required: a ``[..., 1, 1]`` mask broadcasts over any query length, so it is
    causal only when the query is one token long, which the mask alone cannot tell.
    """
    if not isinstance(mask, torch.Tensor) or mask.device.type == "meta" or mask.dim() < 2:
        return False
    n = mask.shape[-1]
    if n < 2 or mask.shape[-2] != n:
        return False
    lower = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == lower).all())
    if not mask.is_floating_point():
        return False
    allowed = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min  # -inf or the dtype's minimum
    return bool((allowed == lower).all() and (blocked == ~lower).all())


class ShapeKeyedMask:
    """Evaluates a shape-only mask sub-graph once per distinct shape; returns ``(mask, is_causal)``.

    ``(None, True)`` when the mask is causal (SDPA then skips it), else ``(mask, False)``. Called
    from a stage graph as a plain function; keyed by the hashable shape values it is given
    (``torch.Size``, ints, devices, dtypes).
    """

    MAX_SHAPES = 8

    def __init__(self, compute: fx.GraphModule, name: str) -> None:
        self.compute = compute
        self.__name__ = self.__qualname__ = name  # fx's code generator names the call after it
        self._decisions: OrderedDict[tuple[Hashable, ...], tuple[torch.Tensor | None, bool]] = OrderedDict()

    def __call__(self, *shape_values: Any) -> tuple[torch.Tensor | None, bool]:
        key = tuple(shape_values)
        decision = self._decisions.get(key)
        if decision is not None:
            self._decisions.move_to_end(key)
            return decision
        with torch.no_grad():
            mask = self.compute(*shape_values)
        decision = (None, True) if is_causal_mask(mask) else (mask, False)
        if mask.device.type != "meta":  # meta runs (memory estimation) see a new mask every time
            self._decisions[key] = decision
            if len(self._decisions) > self.MAX_SHAPES:
                self._decisions.popitem(last=False)
        return decision

    def __repr__(self) -> str:
        return f"ShapeKeyedMask({self.__name__}, {len(self._decisions)} shapes cached)"


def _is_shape_query(node: fx.Node) -> bool:
    """A ``.shape`` / ``.size()`` / ``.device`` / ``.dtype`` query, or a value received from the
    previous stage that is a ``torch.Size``, device or dtype (only shape queries produce those)."""
    if isinstance(node.meta.get("merak_value"), (torch.Size, torch.device, torch.dtype)):
        return True
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _SHAPE_ATTRIBUTES
    if (node.op == "call_method" and node.target in _SHAPE_METHODS) or \
            (node.op == "call_function" and node.target in _SIZE_OPS):
        return not any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values()))
    return False


def _mutates(node: fx.Node) -> bool:
    """In place: what the partitioner counts as a mutation, plus ``del x[i]`` and torch functions
    named like in-place methods (``torch.relu_``), which it does not need to track."""
    if mutated_input(node) is not None or node.target is operator.delitem:
        return True
    if node.op != "call_function" or getattr(node.target, "__module__", None) in ("operator", "_operator"):
        return False  # operator.and_ / or_ are not in-place despite the underscore
    name = _target_name(node)
    return name.endswith("_") and not name.endswith("__")


def _is_pure(node: fx.Node) -> bool:
    """Same inputs, same result: no random numbers, no uninitialized memory, no in-place update."""
    if node.op not in ("call_function", "call_method") or _mutates(node) or _is_random(node):
        return False
    return not any(word in _target_name(node).lower() for word in _UNINITIALIZED)


def _shape_only_closure(mask: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """``(shape queries, interior nodes)`` that compute ``mask`` from shapes alone, or ``None``.

    Interior nodes are pure ``call_function`` / ``call_method`` nodes; any other producer
    (a batch input, parameter, module call) reached without a shape query in between means the
    mask depends on values.
    """
    queries: set[fx.Node] = set()
    interior: set[fx.Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in queries or node in interior:
            continue
        if _is_shape_query(node):
            queries.add(node)
            continue
        if not _is_pure(node):
            return None
        interior.add(node)
        stack.extend(node.all_input_nodes)
    if any(_mutates(user) and user not in interior for node in interior for user in node.users):
        return None  # something outside the sub-graph updates one of its values in place
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(queries, key=order.__getitem__), sorted(interior, key=order.__getitem__)


def _extract(queries: list[fx.Node], interior: list[fx.Node], mask: fx.Node) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {q: graph.placeholder(q.name) for q in queries}
    for node in interior:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[mask])
    return fx.GraphModule(torch.nn.Module(), graph, class_name="ShapeOnlyMask")


def _sdpa_mask(node: fx.Node) -> fx.Node | None:
    """The mask node of an SDPA call that passes an explicit mask and ``is_causal=False``."""
    if node.op != "call_function" or node.target not in _SDPA_TARGETS:
        return None
    args = node.args
    mask = node.kwargs.get("attn_mask", args[_SDPA_MASK_POSITION] if len(args) > _SDPA_MASK_POSITION else None)
    causal = node.kwargs.get("is_causal", args[_SDPA_CAUSAL_POSITION] if len(args) > _SDPA_CAUSAL_POSITION else False)
    return mask if isinstance(mask, fx.Node) and causal is False else None


def _set_mask(node: fx.Node, mask: fx.Node, causal: fx.Node) -> None:
    args, kwargs = list(node.args), dict(node.kwargs)
    for position, key, value in ((_SDPA_MASK_POSITION, "attn_mask", mask), (_SDPA_CAUSAL_POSITION, "is_causal", causal)):
        if len(args) > position:
            args[position] = value
        else:
            kwargs[key] = value
    node.args, node.kwargs = tuple(args), kwargs


def _erase_unused(nodes_in_order: list[fx.Node]) -> None:
    """Erase the nodes nothing uses any more, last first (so a chain goes as a whole)."""
    for node in reversed(nodes_in_order):
        if not node.users:
            node.graph.erase_node(node)


def rewrite_causal_attention(graph: fx.Graph) -> int:
    """Route every SDPA call whose explicit mask is shape-only through a :class:`ShapeKeyedMask`.

    Returns how many SDPA calls were rewritten. The mask's sub-graph is removed when nothing else
    uses it; the new nodes sit where the mask was computed (before the first layer) and carry its
    metadata, so layer detection still sees the same layers.
    """
    by_mask: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        mask = _sdpa_mask(node)
        if mask is not None:
            by_mask.setdefault(mask, []).append(node)
    rewritten = 0
    for mask, calls in by_mask.items():
        closure = _shape_only_closure(mask)
        if closure is None:
            continue
        queries, interior = closure
        decide = ShapeKeyedMask(_extract(queries, interior, mask), f"causal_or_{mask.name}")
        with graph.inserting_before(mask):
            decision = graph.call_function(decide, tuple(queries))
            kept = graph.call_function(operator.getitem, (decision, 0))
            causal = graph.call_function(operator.getitem, (decision, 1))
        # Module path for layer detection; traced values as if the mask were kept (the traced
        # shapes), for passes that read value metadata.
        traced = mask.meta.get("merak_value")
        for new, value in ((decision, (traced, False)), (kept, traced), (causal, False)):
            new.meta.update(mask.meta)
            new.meta["merak_value"] = value
        # The graph passes that planned on the traced graph (tensor parallelism: a scatter of the
        # mask over heads) find the value they planned for under this name.
        kept.meta["merak_stands_for"] = mask.name
        for call in calls:
            _set_mask(call, kept, causal)
        _erase_unused(interior)
        rewritten += len(calls)
    return rewritten
