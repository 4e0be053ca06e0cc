"""Grad-mode regions of a ``torch.export`` graph, inlined into the top graph.

Why: torch.export records a block the model runs under ``torch.no_grad()`` /
``torch.set_grad_enabled(...)`` as one ``torch.ops.higher_order.wrap_with_set_grad_enabled`` node
whose body is a *sub*-GraphModule. Everything Merak does per node - the cost pass on meta, the
stage cut, retargeting the trace device to the stage's device, tensor-parallel rewrites - sees
only the top graph, so a body stays opaque and keeps the trace device its factories were given
(``torch.arange(n, device=x.device)`` becomes ``arange(n, device=cpu)`` inside it): the cost
pass cannot run it on meta (CPM-Ant was untraceable), and on a GPU the stage would create
tensors on the CPU. A switch of grad mode that fails half-way also leaks into the caller.

So each such node is replaced by the body's own nodes, and the region's grad mode becomes data
flow, as the fx tracer records it: a region with grad **disabled** hands each floating output
on through ``detach()`` - the same values, and no gradient flows back into the region, which is
what ``torch.no_grad()`` means for the ops after it. A region with grad enabled is inlined as is
(a stage runs its forward with grad on). Nested regions are inlined too.

``torch.autocast`` regions (``wrap_with_autocast``) cannot be inlined without changing the
precision their ops run in, and their device type is the trace device's; they are refused with a
:class:`~.tracer.TraceError` naming the region (Merak's own ``bf16``/``fp16`` autocast is the fix).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

__all__ = ["inline_grad_mode_regions", "refuse_autocast_regions"]

_SET_GRAD = torch.ops.higher_order.wrap_with_set_grad_enabled
_AUTOCAST = torch.ops.higher_order.wrap_with_autocast
#: node meta a ``detach()`` shares with the value it detaches (the cost pass reads ``val``)
_DETACH_META = ("val", "tensor_meta", "stack_trace", "nn_module_stack")


def _differentiable(node: Any) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def _free_attr_name(owner: torch.nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _inline_one(graph: fx.Graph, owner: torch.nn.Module, hop: fx.Node, model_name: str) -> None:
    """Replace ``hop`` (a ``wrap_with_set_grad_enabled`` node) by its body's nodes."""
    from .tracer import TraceError, resolve_path

    enabled, submod, *operands = hop.args
    body: fx.GraphModule = resolve_path(owner, submod.target)
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(operands) or hop.kwargs:
        raise TraceError(f"torch.export of {model_name}: grad-mode region {hop.name} passes {len(operands)} operands "
                         f"(and kwargs {list(hop.kwargs)}) to a body with {len(placeholders)} inputs; cannot inline it")
    env.update(zip(placeholders, operands))
    results: list[Any] = []
    with graph.inserting_before(hop):
        for node in body.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                results = list(node.args[0]) if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
                continue
            if node.op == "get_attr":  # a constant or a nested region's body: move it to the top module
                name = _free_attr_name(owner, f"{submod.target}_{node.target}".replace(".", "_"))
                setattr(owner, name, resolve_path(body, node.target))
                copied = graph.get_attr(name)
                copied.meta = dict(node.meta)
            else:
                copied = graph.node_copy(node, lambda a: env[a])
            env[node] = copied
        outputs = [fx.node.map_arg(r, lambda a: env[a]) for r in results]
        if not enabled:  # values computed in a no_grad region leave it without a history, as in eager
            computed = {env[n] for n in body.graph.nodes if n.op not in ("placeholder", "output")}
            # an input handed straight through would keep its history in eager (torch 2.13's export
            # routes such a value around the region, so this only guards a future body that returns it)
            for i, value in enumerate(outputs):
                if value in computed and _differentiable(value):
                    detached = graph.call_function(torch.ops.aten.detach.default, (value,))
                    detached.meta = {k: v for k, v in value.meta.items() if k in _DETACH_META}
                    outputs[i] = detached
    for user in list(hop.users):
        if not (user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int)):
            raise TraceError(f"torch.export of {model_name}: the output of grad-mode region {hop.name} is used by "
                             f"{user.format_node()}, not by an indexing; cannot inline it")
        user.replace_all_uses_with(outputs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(hop)
    if not submod.users:
        graph.erase_node(submod)
        if not any(n.op == "get_attr" and n.target == submod.target for n in graph.nodes):
            delattr(owner, submod.target)


def inline_grad_mode_regions(graph: fx.Graph, model_name: str) -> int:
    """Inline every ``wrap_with_set_grad_enabled`` node of ``graph`` (nested ones included) into
    ``graph``, removing the bodies from its owning module; returns how many were inlined."""
    owner = graph.owning_module
    count = 0
    while True:
        hop = next((n for n in graph.nodes if n.op == "call_function" and n.target is _SET_GRAD), None)
        if hop is None:
            return count
        if owner is None:
            from .tracer import TraceError

            raise TraceError(f"torch.export of {model_name}: the graph has a grad-mode region but no owning module")
        _inline_one(graph, owner, hop, model_name)
        count += 1


def refuse_autocast_regions(graph: fx.Graph, model_name: str) -> None:
    """Raise :class:`~.tracer.TraceError` if ``graph`` holds a ``torch.autocast`` region."""
    from .tracer import TraceError

    regions = [n for n in graph.nodes if n.op == "call_function" and n.target is _AUTOCAST]
    if regions:
        where = ", ".join(f"{n.name} (device_type={n.args[0]!r}, dtype={n.args[1]}, enabled={n.args[2]})" for n in regions)
        raise TraceError(
            f"torch.export of {model_name} recorded torch.autocast regions: {where}. A stage graph cannot carry "
            "them (inlined, their ops would run in another precision; kept, they pin the trace device type); "
            "remove torch.autocast from forward and set MerakArguments bf16/fp16, which autocasts every stage"
        )
