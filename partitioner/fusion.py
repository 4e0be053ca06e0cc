"""Fusion of traced op chains into the one native kernel that computes the same function.

Why: tracing records what the model's Python does, op by op. Hugging Face's ``gelu_new``
(GPT-2, GPT-J, ...) is written as ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))``:
eight element-wise kernels forward, more backward, each reading and writing the whole MLP
activation - on the CPU throughput benchmark about 13 % of a training step. PyTorch has the
same function as one kernel, ``F.gelu(x, approximate="tanh")`` (equal to within float
rounding, ~2e-7). A stage is an fx graph Merak owns, so it can swap the chain for the kernel
without touching the user's model.

Each rule matches a chain by its ops and constants and only when its intermediate values have
no other users, and the chain's output node becomes the kernel call - same name, metadata
(module path, traced value) and users - so layer detection, recomputation, tensor parallelism
and the memory estimator (which profiles :func:`fused_copy` of the traced graph) see the same
graph shape.

The second rule, ``causal-attention`` (:mod:`.causal_attention`), gives SDPA calls whose traced
mask is built from shapes alone a per-shape cached decision: ``is_causal=True`` when the mask is
the causal triangle (what the eager model would have passed), the mask otherwise. On meta tensors
(the memory estimator) the decision keeps the mask.
``build_stage(..., fuse=False)`` / ``MerakArguments(fuse_ops=False)`` turns all rules off.

The contract every rule keeps, because plans made on the *traced* graph (tensor parallelism's
layouts, edits and inserted collectives, keyed by node name) are applied to the *rewritten*
stage: a node whose value survives keeps its name; a new node that carries an old value in the
old one's place (the causal rule's ``mask or None``) records the old name in
``meta["merak_stands_for"]``; nodes that vanish are interior to a rewrite, with nothing for a
plan to change (no sizes to divide). ``tests/test_tensor_parallel.py`` runs each rule under tp=2.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .causal_attention import rewrite_causal_attention

__all__ = ["FUSIONS", "fuse", "fused_copy"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _is_const(value: Any, expected: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isclose(value, expected, rel_tol=1e-6)


def _call(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets and not node.kwargs


def _scaled(node: Any, factor: float) -> fx.Node | None:
    """``x`` if ``node`` is ``factor * x`` (either operand order), else ``None``."""
    if not _call(node, operator.mul, torch.mul) or len(node.args) != 2:
        return None
    a, b = node.args
    if _is_const(a, factor) and isinstance(b, fx.Node):
        return b
    if _is_const(b, factor) and isinstance(a, fx.Node):
        return a
    return None


def _sum_operands(node: Any) -> tuple[Any, Any] | None:
    if not _call(node, operator.add, torch.add) or len(node.args) != 2:
        return None
    return node.args[0], node.args[1]


def _tanh_gelu_input(out: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """Match ``(0.5 * x) * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x ** 3)))`` ending at ``out``;
    return ``x`` and the chain's nodes (``out`` last)."""
    if not _call(out, operator.mul, torch.mul) or len(out.args) != 2:
        return None
    for half, one_plus in (out.args, out.args[::-1]):
        x = _scaled(half, 0.5)
        operands = _sum_operands(one_plus)
        if x is None or operands is None:
            continue
        tanh = next((o for o in operands if _call(o, torch.tanh)), None)
        if tanh is None or not any(_is_const(o, 1.0) for o in operands):
            continue
        inner = _scaled(tanh.args[0], _SQRT_2_OVER_PI)  # x + 0.044715 * x ** 3
        summed = _sum_operands(inner)
        if summed is None or x not in summed:
            continue
        scaled_cubic = summed[1] if summed[0] is x else summed[0]
        power = _scaled(scaled_cubic, 0.044715)
        if not (_call(power, torch.pow, operator.pow) and power.args[0] is x and _is_const(power.args[1], 3.0)):
            continue
        return x, [power, scaled_cubic, inner, tanh.args[0], tanh, one_plus, half, out]
    return None


def _fuse_tanh_gelu(graph: fx.Graph) -> int:
    fused = 0
    for out in list(graph.nodes):
        match = _tanh_gelu_input(out)
        if match is None:
            continue
        x, chain = match
        if any(len(n.users) != 1 for n in chain[:-1]):
            continue  # an intermediate value is used elsewhere: fusing would not remove it
        # The chain's last node becomes the kernel call: it keeps its name, metadata (module path,
        # traced value) and users, so per-node bookkeeping keyed by name (stage membership, the
        # memory estimator's saved-tensor profile) still finds it.
        out.target, out.args, out.kwargs = F.gelu, (x,), {"approximate": "tanh"}
        for node in reversed(chain[:-1]):
            graph.erase_node(node)
        fused += 1
    return fused


#: name -> rule; a rule rewrites every match in the graph and returns how many it fused.
FUSIONS: dict[str, Callable[[fx.Graph], int]] = {
    "tanh-gelu": _fuse_tanh_gelu,
    "causal-attention": rewrite_causal_attention,  # traced causal mask -> SDPA's is_causal
}


def fused_copy(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` (same node names and metadata) with every rule applied: what the
    stages built from it will run, for estimators that walk the whole traced graph."""
    copy = fx.Graph()
    output = copy.graph_copy(graph, {})
    if output is not None:
        copy.output(output)
    _apply_rules(copy)
    return copy


def _apply_rules(graph: fx.Graph) -> dict[str, int]:
    """Every rule of :data:`FUSIONS` applied to ``graph`` in place; the non-zero counts."""
    counts = {name: rule(graph) for name, rule in FUSIONS.items()}
    return {name: n for name, n in counts.items() if n}


def fuse(module: fx.GraphModule) -> dict[str, int]:
    """Apply every rule of :data:`FUSIONS` to ``module`` in place; returns the non-zero counts."""
    counts = _apply_rules(module.graph)
    if counts:
        module.graph.lint()
        module.recompile()
    return counts
