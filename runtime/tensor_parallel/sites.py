"""Where a traced graph applies a parameter as a linear layer or an embedding, in either flavour.

Why a module of its own: the planner must not depend on *how* the model was traced. An fx
graph shows ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` as ``call_module`` nodes, but code that
calls ``F.linear(x, self.weight)`` or ``F.embedding`` itself (Gemma2's scaled word embedding, an
``nn.Embedding`` subclass traced through) shows a ``call_function`` on a ``get_attr`` parameter;
a ``torch.export`` graph shows *only* the latter, as ATen ops (``aten.linear``, ``aten.addmm``
for ``Conv1D``, ``aten.mm`` / ``aten.matmul``, ``aten.embedding``). A *site* is one such
application, with where its input and parameters sit in the node's arguments, so the search
(:mod:`.propagate`) and the graph rewrite (:mod:`.apply`) treat all of them alike.

A functional site is named after the module whose forward made the call when that module holds
the weight itself (``model.decoder.layers.0.fc1``, as for a ``call_module`` node), else after the
parameter's owner; a weight that is not the owner's ``weight`` is named ``owner.attr``
(``...experts.gate_up_proj``). These names are what ``tp_mapping`` patterns match.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx, nn

__all__ = ["LinearSite", "EmbeddingSite", "op_name", "linear_kind", "find_linear_sites", "find_embedding_sites"]

#: functional linear ops -> (input position, weight position, bias position or None, weight is (in, out))
_LINEAR_OPS: dict[str, tuple[int, int, int | None, bool]] = {
    "linear": (0, 1, 2, False),
    "addmm": (1, 2, 0, True),
    "mm": (0, 1, None, True),
    "matmul": (0, 1, None, True),
}


def op_name(node: fx.Node) -> str:
    """The op's plain name for both flavours: ``view`` for ``Tensor.view``, ``torch.view`` and
    ``aten.view.default`` alike."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        target = node.target
        if target is getattr:
            return "getattr"
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return target._opname if isinstance(target, torch._ops.OpOverload) else target.__name__
        return getattr(target, "__name__", str(target))
    return node.op


def linear_kind(module: nn.Module) -> str | None:
    """``Linear`` / ``Conv1D`` for the linear modules kept as ``call_module`` nodes, else None."""
    if isinstance(module, nn.Linear):
        return "Linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "Conv1D"
    return None


@dataclasses.dataclass(frozen=True)
class LinearSite:
    """One linear layer applied in the graph.

    ``kind``: ``Linear`` / ``Conv1D`` (a module call) or the op (``linear``, ``addmm``, ``mm``,
    ``matmul``). ``weight`` / ``bias``: argument positions of the parameters (functional sites;
    ``None`` for a module or when absent); ``transposed``: the weight is stored ``(in, out)``.
    """

    node: str
    module: str
    kind: str
    input_pos: int
    in_features: int
    out_features: int
    transposed: bool
    weight: int | None = None
    bias: int | None = None

    @property
    def functional(self) -> bool:
        return self.weight is not None


@dataclasses.dataclass(frozen=True)
class EmbeddingSite:
    """One embedding lookup applied in the graph (a module call, or ``F.embedding`` / ``aten.embedding``).

    ``weight`` / ``ids``: argument positions (functional sites); ``module_type``: the class of the
    module that made the call (``Gemma2ScaledWordEmbedding``), for messages.
    """

    node: str
    module: str
    num_embeddings: int
    module_type: str
    padding_idx: int | None = None
    weight: int | None = None
    ids: int | None = None
    options: tuple[str, ...] = ()

    @property
    def functional(self) -> bool:
        return self.weight is not None


def _parameter(model: nn.Module, arg: Any) -> nn.Parameter | None:
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    obj: Any = model
    try:
        for part in str(arg.target).split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return None
    return obj if isinstance(obj, nn.Parameter) else None


def _site_name(model: nn.Module, caller: str, weight_node: fx.Node, weight: nn.Parameter) -> str:
    """The caller module when it holds ``weight`` directly, else the parameter's owner path."""
    owner, attr = caller, None
    try:
        module = model.get_submodule(caller) if caller else model
        attr = next((n for n, p in module.named_parameters(recurse=False) if p is weight), None)
    except AttributeError:
        attr = None
    if attr is None:
        owner, _, attr = str(weight_node.target).rpartition(".")
    return owner if attr == "weight" else (f"{owner}.{attr}" if owner else attr)


def find_linear_sites(graph: fx.Graph, model: nn.Module, module_of: dict[str, str]) -> dict[str, LinearSite]:
    """Node name -> :class:`LinearSite` for every linear layer the graph applies.

    ``module_of``: node name -> path of the module whose forward created the node (ProxyGraph).
    A functional op counts only when its weight is a 2-d model parameter read through
    ``get_attr`` and its input is not a parameter (``x @ W``, not ``W1 @ W2``).
    """
    sites: dict[str, LinearSite] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            module = model.get_submodule(str(n.target))
            kind = linear_kind(module)
            if kind is None:
                continue
            conv1d = kind == "Conv1D"
            out = int(module.nf) if conv1d else module.out_features
            inp = int(module.weight.shape[0]) if conv1d else module.in_features
            sites[n.name] = LinearSite(n.name, str(n.target), kind, 0, inp, out, conv1d)
            continue
        if n.op != "call_function":
            continue
        spec = _LINEAR_OPS.get(op_name(n))
        if spec is None or n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
            continue
        x_pos, w_pos, b_pos, transposed = spec
        if len(n.args) <= max(x_pos, w_pos):
            continue
        weight = _parameter(model, n.args[w_pos])
        if weight is None or weight.dim() != 2 or _parameter(model, n.args[x_pos]) is not None:
            continue
        bias_pos = b_pos if b_pos is not None and len(n.args) > b_pos and n.args[b_pos] is not None else None
        if bias_pos is not None:
            bias = _parameter(model, n.args[bias_pos])
            if bias is None or bias.dim() != 1:
                continue
        inp, out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
        name = _site_name(model, module_of.get(n.name, ""), n.args[w_pos], weight)
        sites[n.name] = LinearSite(n.name, name, op_name(n), x_pos, int(inp), int(out), transposed, w_pos, bias_pos)
    return sites


def find_embedding_sites(graph: fx.Graph, model: nn.Module, module_of: dict[str, str]) -> dict[str, EmbeddingSite]:
    """Node name -> :class:`EmbeddingSite` for every embedding lookup the graph applies."""
    sites: dict[str, EmbeddingSite] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            module = model.get_submodule(str(n.target))
            if isinstance(module, nn.Embedding):
                options = tuple(o for o in ("max_norm", "scale_grad_by_freq", "sparse") if getattr(module, o, None))
                sites[n.name] = EmbeddingSite(n.name, str(n.target), module.num_embeddings, type(module).__name__,
                                              module.padding_idx, options=options)
            continue
        if n.op != "call_function" or op_name(n) != "embedding":
            continue
        aten = isinstance(n.target, torch._ops.OpOverload)
        w_pos, ids_pos = (0, 1) if aten else (1, 0)
        if len(n.args) <= max(w_pos, ids_pos):
            continue
        weight = _parameter(model, n.args[w_pos])
        if weight is None or weight.dim() != 2:
            continue
        args = list(n.args)
        if aten:  # embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False)
            padding = args[2] if len(args) > 2 else n.kwargs.get("padding_idx", -1)
            options = tuple(o for o, i in (("scale_grad_by_freq", 3), ("sparse", 4))
                            if (args[i] if len(args) > i else n.kwargs.get(o, False)))
        else:  # F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
            padding = args[2] if len(args) > 2 else n.kwargs.get("padding_idx")
            padding = padding + int(weight.shape[0]) if padding is not None and padding < 0 else padding
            options = tuple(o for o, i in (("max_norm", 3), ("scale_grad_by_freq", 5), ("sparse", 6))
                            if (args[i] if len(args) > i else n.kwargs.get(o)))
        padding = None if padding is None or padding < 0 else int(padding)
        caller = module_of.get(n.name, "")
        name = _site_name(model, caller, n.args[w_pos], weight)
        try:
            module_type = type(model.get_submodule(caller)).__name__ if caller else type(model).__name__
        except AttributeError:
            module_type = "?"
        sites[n.name] = EmbeddingSite(n.name, name, int(weight.shape[0]), module_type, padding, w_pos, ids_pos, options)
    return sites
