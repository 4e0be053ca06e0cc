"""Sharding propagation: follow a tentatively column-sharded value through the traced graph.

The engine behind :func:`merak.runtime.tensor_parallel.plan.plan_tensor_parallel`. A :class:`Region`
starts from one or more column layers, gives their outputs a *layout* (sharded on the last
dim) and visits every node that reads a sharded value, in graph order, applying the op's rule:
the layout of its output, the constants to rewrite (:class:`Edit`), the communication to insert
where replicated values enter (:class:`Insert`), or a failure that says which op stopped it and
which seed layers are to blame. Layouts carry the traced full shapes' semantics only; nothing
here touches tensors or processes.

Rules, by op family: pointwise/broadcasting ops, softmax over another dim, reductions over
other dims, views (a sharded dim split into (heads, head_dim) stays sharded on the major part),
transposes/permutes, ``split``/``chunk`` of a fused projection (per block), ``cat``, batched
``matmul`` and ``scaled_dot_product_attention`` over heads, ``expand``, indexing that keeps the
sharded dim whole, shape queries (per-rank sizes are tracked so a ``view`` built from them is
left alone), the LM head's ``cross_entropy``, and linear layers reading a value sharded on their
input features (row-parallel partners).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import heapq
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from merak.runtime.tensor_parallel.sites import (
    EmbeddingSite,
    LinearSite,
    find_embedding_sites,
    find_linear_sites,
    op_name,
)

__all__ = ["Edit", "Insert", "GraphContext", "Region", "Violation", "Blocked", "NeedsColumns"]

_MAX_UPSTREAM = 400  # nodes visited when looking for the linear layer behind a replicated operand


@dataclasses.dataclass(frozen=True)
class Edit:
    """Rewrite of one argument of graph node ``node``.

    ``path`` indexes into ``("args"|"kwargs", ...)``. ``kind``: ``set`` (constant -> ``value``),
    ``div`` (a symbolic full size -> size // tp), ``div_entry`` (a whole shape tuple whose entry
    ``value`` is a full size -> divided by tp).
    """

    node: str
    path: tuple[Any, ...]
    kind: str
    value: int = 0
    op: str = ""
    old: int | None = None

    def describe(self) -> str:
        if self.kind == "set":
            return f"{self.op} {self.old} -> {self.value}"
        return f"{self.op} (size computed in the graph) / tp"


@dataclasses.dataclass(frozen=True)
class Insert:
    """A communication op inserted on the edge ``value -> consumer``: ``copy`` (identity forward,
    gradient all-reduce) or ``scatter`` along ``dim`` (this rank's chunk, gradient all-gather)."""

    kind: str
    value: str
    consumer: str
    dim: int | None = None


# ---- layouts ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _S:
    """A tensor sharded on ``dim`` (contiguous chunks in rank order). ``origins``: the seed
    linear layers it comes from; ``column``: the column layer whose output features map 1:1 onto
    ``dim`` (needed to split fused projections per block)."""

    dim: int
    origins: frozenset[str]
    column: str | None = None


@dataclasses.dataclass(frozen=True)
class _Shape:
    """A shape tuple of a sharded tensor; entry ``index`` is a local (per-rank) size."""

    index: int | None
    origins: frozenset[str]


@dataclasses.dataclass(frozen=True)
class _LocalInt:
    """A Python int derived from a sharded (local) size."""

    origins: frozenset[str]


class Blocked(Exception):
    def __init__(self, node: str, reason: str, blame: frozenset[str]) -> None:
        super().__init__(reason)
        self.node, self.reason, self.blame = node, reason, blame


class NeedsColumns(Exception):
    def __init__(self, linears: set[str]) -> None:
        super().__init__(f"needs columns {sorted(linears)}")
        self.linears = linears


@dataclasses.dataclass
class Violation:
    size: int
    what: str
    blame: frozenset[str]
    node: str


# ---- op tables -------------------------------------------------------------------------------------
_POINTWISE = {
    "add", "sub", "mul", "truediv", "div", "neg", "pow", "tanh", "exp", "log", "sigmoid", "relu", "gelu",
    "silu", "abs", "sqrt", "rsqrt", "erf", "sin", "cos", "where", "masked_fill", "clamp", "clamp_min",
    "clamp_max", "dropout", "float", "half", "bfloat16", "double", "to", "type", "contiguous", "clone",
    "detach", "type_as", "rsub", "reciprocal", "square", "softplus", "mish", "leaky_relu", "elu", "hardtanh",
    "relu6", "hardswish", "hardsigmoid", "logical_not", "eq", "ne", "lt", "gt", "le", "ge", "and_", "or_",
    "minimum", "maximum", "expm1", "log1p", "sign", "alpha_dropout", "feature_alpha_dropout", "dropout1d",
    "dropout2d", "sigmoid_", "add_", "mul_", "sub_", "div_", "masked_fill_", "iadd", "imul", "isub",
    "itruediv", "tanh_", "relu_", "clamp_", "fill_", "zero_", "erf_", "invert", "logical_and", "logical_or",
    "nan_to_num", "floor", "ceil", "round", "trunc", "gelu_", "silu_", "requires_grad_",
}
_SOFTMAX = {"softmax", "log_softmax", "_softmax"}
_VIEWS = {"view", "reshape", "_unsafe_view"}
_SHAPE_ONLY_VIEWS = {"unsqueeze", "squeeze", "flatten"}
_TRANSPOSES = {"transpose", "swapaxes", "swapdims"}
_MATMULS = {"matmul", "bmm"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "norm", "var", "std", "logsumexp", "prod",
               "all", "any", "argmax", "argmin", "cumsum"}
_CREATION = {"zeros", "ones", "empty", "full", "rand", "randn", "new_zeros", "new_ones", "new_empty",
             "new_full", "arange"}
_INT_SCALING = {"mul", "floordiv", "truediv"}
_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid,
    nn.Identity, nn.Mish, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.ReLU6, nn.Softplus, nn.GLU,
)


def _aten_pointwise(name: str) -> bool:
    packet = getattr(torch.ops.aten, name.rstrip("_"), None)
    if packet is None:
        return False
    try:
        return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())
    except Exception:  # noqa: BLE001 - an odd op: not pointwise
        return False


# ---- the propagation context -------------------------------------------------------------------------
class GraphContext:
    """Graph-wide facts shared by all regions."""

    def __init__(self, graph: Any, tp: int, mapping: Mapping[str, str]) -> None:
        from merak.partitioner.proxy_graph import TensorMeta

        self.pg, self.tp = graph, tp
        self.model: nn.Module = graph.model
        self.TensorMeta = TensorMeta
        self.nodes: list[fx.Node] = list(graph.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.mapping = dict(mapping)
        self.config = getattr(self.model, "config", None)
        module_of = {n.name: graph.by_name[n.name].module for n in self.nodes}
        self.sites: dict[str, LinearSite] = find_linear_sites(graph.graph, self.model, module_of)
        self.embeddings: dict[str, EmbeddingSite] = find_embedding_sites(graph.graph, self.model, module_of)
        self.linears: dict[str, str] = {n: site.module for n, site in self.sites.items()}  # node -> module name
        self.vocab_sizes = {m.num_embeddings for m in self.model.modules() if isinstance(m, nn.Embedding)}
        self.assigned: dict[str, str] = {}  # linear node -> "column" | "row"

    # -- metadata
    def meta(self, name: str) -> Any:
        return self.pg.by_name[name].meta

    def shape(self, x: Any) -> tuple[int, ...] | None:
        if isinstance(x, fx.Node):
            m = self.meta(x.name)
            return tuple(m.shape) if isinstance(m, self.TensorMeta) else None
        return None

    def is_tensor(self, x: Any) -> bool:
        return isinstance(x, fx.Node) and isinstance(self.meta(x.name), self.TensorMeta)

    def requires_grad(self, x: fx.Node) -> bool:
        m = self.meta(x.name)
        return bool(getattr(m, "requires_grad", False))

    def module(self, node: fx.Node) -> nn.Module:
        return self.model.get_submodule(str(node.target))

    def site_weight(self, node: str) -> nn.Parameter:
        """The weight parameter a linear or embedding site applies."""
        site = self.sites.get(node) or self.embeddings[node]
        n = self.by_name[node]
        if not site.functional:
            return self.module(n).weight
        obj: Any = self.model
        for part in str(n.args[site.weight].target).split("."):
            obj = getattr(obj, part)
        return obj

    def style_of(self, module: str) -> str | None:
        for pattern, style in self.mapping.items():
            if fnmatch.fnmatchcase(module, pattern):
                return style
        return None

    def where(self, name: str) -> str:
        node = self.by_name[name]
        src = node.meta.get("merak_source") or ""
        module = self.pg.by_name[name].module
        return f"{module or 'the model'}: {op_name(node)} node {name!r}{' at ' + src if src else ''}"

    def size_name(self, size: int, what: str) -> str:
        """``num_attention_heads=12`` style name of a size, from the model config when it matches."""
        prefer = {
            "heads": ("num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "encoder_attention_heads",
                      "decoder_attention_heads"),
            "kv_heads": ("num_key_value_heads", "num_attention_heads", "n_head", "num_heads"),
            "vocab": ("vocab_size",),
            "features": ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "hidden_size", "n_embd", "d_model",
                         "inner_dim"),
        }.get(what, ())
        cfg = self.config
        if cfg is not None:
            for attr in prefer:
                if getattr(cfg, attr, None) == size:
                    return f"{attr}={size}"
            if what == "features" and getattr(cfg, "n_inner", 1) is None and getattr(cfg, "n_embd", 0) * 4 == size:
                return f"n_inner=4*n_embd={size}"
        label = {"heads": "attention heads", "kv_heads": "key/value heads", "vocab": "vocabulary",
                 "features": "features"}.get(what, what)
        return f"{label}={size}"


# ---- one region --------------------------------------------------------------------------------------
class Region:
    """Tentatively shard ``seeds`` (column layers) and follow the sharded values."""

    def __init__(self, ctx: GraphContext, seeds: set[str], excluded: set[str], trust: bool) -> None:
        self.ctx, self.seeds, self.excluded, self.trust = ctx, set(seeds), excluded, trust
        self.layouts: dict[str, Any] = {}
        self.columns: dict[str, tuple[int, ...] | None] = {s: None for s in seeds}
        self.rows: set[str] = set()
        self.losses: dict[str, dict[str, Any]] = {}
        self.edits: list[Edit] = []
        self.inserts: dict[tuple[str, str, str, int | None], Insert] = {}
        self.required: list[tuple[int, str, bool]] = []
        self.violations: list[Violation] = []
        self.outputs: dict[str, int] = {}
        self.notes: list[str] = []
        self.vocab_head = False
        self.replicated: dict[str, str] = {}  # joined linear layers left replicated, and why

    def sharded_dims(self) -> dict[str, int]:
        """Node name -> sharded dim, for every tensor value this region shards."""
        return {name: l.dim for name, l in self.layouts.items() if isinstance(l, _S)}

    # -- helpers
    def lay(self, x: Any) -> Any:
        return self.layouts.get(x.name) if isinstance(x, fx.Node) else None

    def fail(self, node: fx.Node, reason: str, blame: Iterable[str] | None = None) -> Blocked:
        if blame is None:
            blame = frozenset().union(*[l.origins for l in self._input_layouts(node)]) or frozenset(self.seeds)
        return Blocked(node.name, f"{reason} at {self.ctx.where(node.name)}", frozenset(blame))

    def _input_layouts(self, node: fx.Node) -> list[Any]:
        out = []
        for n in node.all_input_nodes:
            l = self.layouts.get(n.name)
            if isinstance(l, tuple):
                out.extend(x for x in l if x is not None)
            elif l is not None:
                out.append(l)
        return out

    def require(self, size: int, what: str, node: fx.Node, blame: frozenset[str], flexible: bool = False) -> None:
        if what == "features" and size in self.ctx.vocab_sizes:
            what = "vocab"
        self.required.append((size, what, flexible))
        if size % self.ctx.tp:
            self.violations.append(Violation(size, what, blame, node.name))

    def insert(self, kind: str, value: fx.Node, consumer: fx.Node, dim: int | None = None) -> None:
        self.inserts[(kind, value.name, consumer.name, dim)] = Insert(kind, value.name, consumer.name, dim)

    def edit(self, node: fx.Node, path: tuple[Any, ...], kind: str, value: int = 0, old: int | None = None) -> None:
        self.edits.append(Edit(node.name, path, kind, value, op_name(node), old))

    # -- driver
    def run(self) -> None:
        ctx = self.ctx
        heap: list[int] = []
        for seed in sorted(self.seeds, key=ctx.index.__getitem__):
            node = ctx.by_name[seed]
            x = node.args[ctx.sites[seed].input_pos]
            if self.lay(x) is not None or not ctx.is_tensor(x):
                raise self.fail(node, "a column layer's input must be replicated", {seed})
            self.layouts[seed] = _S(len(ctx.shape(node)) - 1, frozenset({seed}), column=seed)
            self.insert("copy", x, node)
            for user in node.users:
                heapq.heappush(heap, ctx.index[user.name])
        visited: set[str] = set()
        while heap:
            node = ctx.nodes[heapq.heappop(heap)]
            if node.name in visited:
                continue
            visited.add(node.name)
            if node.name in self.seeds:
                continue
            try:
                layout = self.visit(node)
            except (Blocked, NeedsColumns):
                raise
            except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
                # a rule met arguments it does not model (a dim computed at run time, ...): the
                # region is not provably correct, so its layers stay replicated, with the reason
                raise self.fail(node, f"the planner cannot follow '{op_name(node)}' with these arguments "
                                      f"({type(exc).__name__}: {exc})") from exc
            if layout is not None:
                self.layouts[node.name] = layout
                for user in node.users:
                    heapq.heappush(heap, ctx.index[user.name])
        for seed in self.seeds:  # a column joined late (Doge's dt_proj) may read what the region shards
            node = ctx.by_name[seed]
            x = node.args[ctx.sites[seed].input_pos]
            if isinstance(self.lay(x), _S):
                raise self.fail(node, "a column layer's input is sharded by the region it joined", {seed})
        for column, blocks in self.columns.items():
            out = ctx.sites[column].out_features
            what = "vocab" if self.vocab_head else "features"
            for b in blocks or (out,):
                self.require(b, what, ctx.by_name[column], frozenset({column}))

    # -- dispatch
    def visit(self, node: fx.Node) -> Any:
        if node.op == "output":
            return self._output(node)
        if node.name in self.ctx.sites:
            return self._linear(node)
        if node.op == "call_module":
            return self._call_module(node)
        name = op_name(node)
        inputs = self._input_layouts(node)
        if not inputs:
            return None
        if any(isinstance(l, (_LocalInt, _Shape)) for l in inputs) and not any(isinstance(l, _S) for l in inputs):
            return self._int_op(node, name)
        if name == "getitem":
            return self._getitem(node)
        if name == "getattr":
            return self._getattr(node)
        if name in ("size", "sym_size", "dim", "numel", "sym_numel", "stride"):
            return self._size(node, "size" if name == "sym_size" else name)
        if name == "slice":
            return self._slice(node)
        if name == "select":
            return self._select(node)
        if name in _VIEWS:
            return self._view(node)
        if name in _SHAPE_ONLY_VIEWS:
            return self._view(node, sizes=False)
        if name in _TRANSPOSES or name in ("permute", "t"):
            return self._permute(node, name)
        if name in ("expand", "expand_as"):
            return self._expand(node, name)
        if name in ("split", "chunk", "split_with_sizes", "tensor_split"):
            return self._split(node, name)
        if name in ("cat", "concat", "concatenate"):
            return self._cat(node)
        if name in _MATMULS:
            return self._matmul(node)
        if name == "scaled_dot_product_attention":
            return self._sdpa(node)
        if name in _SOFTMAX:
            return self._softmax(node)
        if name == "cross_entropy":
            return self._cross_entropy(node, node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("target"),
                                       dict(node.kwargs))
        if name == "cross_entropy_loss":  # ATen: (input, target, weight, reduction enum, ignore_index, label_smoothing)
            return self._cross_entropy(node, node.args[0], node.args[1], _aten_cross_entropy_options(node))
        if name == "embedding":
            raise self.fail(node, "a sharded value is used as embedding weights or indices")
        if name in _REDUCTIONS:
            return self._reduction(node)
        if name in _POINTWISE or _aten_pointwise(name):
            return self._pointwise(node, name)
        if self.trust:
            self.notes.append(f"{self.ctx.where(node.name)} passed as pointwise (user-mapped region)")
            return self._pointwise(node, name)
        raise self.fail(node, f"sharded value reaches op '{name}' that the planner does not know")

    # -- graph output
    def _output(self, node: fx.Node) -> None:
        value = node.args[0]
        items = value.items() if isinstance(value, dict) else enumerate(value if isinstance(value, (tuple, list)) else [value])
        for key, v in items:
            l = self.lay(v)
            if isinstance(l, _S):
                if not self.vocab_head:
                    raise self.fail(node, f"sharded value {v.name} is a model output ({key!r})", l.origins)
                self.outputs[str(key)] = l.dim
        return None

    # -- linear layers (modules or functional sites) and other modules
    def _linear(self, node: fx.Node) -> None:
        ctx = self.ctx
        site = ctx.sites[node.name]
        x = node.args[site.input_pos] if len(node.args) > site.input_pos else None
        l = self.lay(x)
        if not isinstance(l, _S):
            raise self.fail(node, f"linear layer {site.module} reads a sharded value through a non-input argument")
        style = ctx.style_of(site.module)
        if style in ("replicate", "column") or node.name in self.excluded:
            raise self.fail(node, f"sharded value reaches {site.module}, mapped to {style or 'replicate'}", l.origins)
        if l.dim != len(ctx.shape(x)) - 1:
            raise self.fail(node, f"linear layer {site.module} reads a value sharded on dim {l.dim}, "
                                  f"not on its input features")
        self.rows.add(node.name)
        self.require(site.in_features, "features", node, l.origins)
        return None

    def _call_module(self, node: fx.Node) -> Any:
        ctx = self.ctx
        module = ctx.module(node)
        if isinstance(module, _ELEMENTWISE_MODULES):
            return self._pointwise(node, type(module).__name__)
        if isinstance(module, nn.CrossEntropyLoss):
            opts = {"weight": module.weight, "ignore_index": module.ignore_index, "reduction": module.reduction,
                    "label_smoothing": module.label_smoothing}
            return self._cross_entropy(node, node.args[0], node.args[1], opts)
        if self.trust:
            self.notes.append(f"{ctx.where(node.name)} passed as pointwise (user-mapped region)")
            return self._pointwise(node, type(module).__name__)
        raise self.fail(node, f"sharded value enters module {node.target} ({type(module).__name__}), whose "
                              f"inside the planner cannot see")

    # -- Python ints and shapes
    def _int_op(self, node: fx.Node, name: str) -> Any:
        ls = self._input_layouts(node)
        origins = frozenset().union(*[l.origins for l in ls])
        if name == "getitem" and isinstance(self.lay(node.args[0]), (_Shape, tuple)):
            return self._getitem(node)
        if name in _INT_SCALING and all(isinstance(l, _LocalInt) for l in ls) and len(ls) == 1:
            others = [a for a in node.args if not isinstance(self.lay(a), _LocalInt)]
            if all(isinstance(a, (int, float)) for a in others):
                return _LocalInt(origins)
        if name in _CREATION or name in _VIEWS or name == "expand":
            return self._created(node, name)
        if name in ("add",) and all(isinstance(l, _Shape) for l in ls):
            return self._shape_concat(node)
        raise self.fail(node, f"a per-rank size (of a sharded tensor) is used by '{name}'", origins)

    def _shape_concat(self, node: fx.Node) -> Any:
        a, b = node.args[0], node.args[1]
        la, lb = self.lay(a), self.lay(b)
        if isinstance(la, _Shape) and lb is None and la.index is not None:
            return _Shape(la.index, la.origins)
        if isinstance(lb, _Shape) and la is None and lb.index is not None:
            va = self.ctx.meta(a.name) if isinstance(a, fx.Node) else a
            return _Shape(len(va) + lb.index, lb.origins)
        raise self.fail(node, "shapes of sharded tensors concatenated")

    def _created(self, node: fx.Node, name: str) -> Any:
        """A tensor created with a per-rank size is itself sharded on that dim."""
        if name in _VIEWS or name == "expand":
            raise self.fail(node, f"a per-rank size is used to {name} a replicated tensor")
        sizes = [a for a in node.args if not (isinstance(a, fx.Node) and self.ctx.is_tensor(a))]
        flat: list[Any] = []
        for a in sizes:
            flat.extend(a if isinstance(a, (tuple, list)) else [a])
        dims = [i for i, a in enumerate(flat) if isinstance(self.lay(a), _LocalInt)]
        if name == "arange":
            dims = [0] if dims else []
        if len(dims) != 1:
            raise self.fail(node, f"'{name}' with per-rank sizes in {len(dims)} dims")
        return _S(dims[0], frozenset().union(*[l.origins for l in self._input_layouts(node)]))

    def _size(self, node: fx.Node, name: str) -> Any:
        l = self.lay(node.args[0])
        if not isinstance(l, _S):
            return None
        if name == "size":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dim is None:
                return _Shape(l.dim, l.origins)
            ndim = len(self.ctx.shape(node.args[0]))
            return _LocalInt(l.origins) if dim % ndim == l.dim else None
        if name == "numel":
            return _LocalInt(l.origins)
        return None

    def _getattr(self, node: fx.Node) -> Any:
        l, attr = self.lay(node.args[0]), node.args[1]
        if not isinstance(l, _S):
            return None
        if attr == "shape":
            return _Shape(l.dim, l.origins)
        if attr in ("device", "dtype", "is_cuda", "requires_grad", "ndim"):
            return None
        if attr in ("T", "mT"):
            ndim = len(self.ctx.shape(node.args[0]))
            if attr == "T":
                return _S(ndim - 1 - l.dim, l.origins)
            return _S({ndim - 1: ndim - 2, ndim - 2: ndim - 1}.get(l.dim, l.dim), l.origins, l.column)
        raise self.fail(node, f"attribute {attr!r} of a sharded tensor")

    def _slice(self, node: fx.Node) -> Any:
        """ATen's ``slice(x, dim, start, end, step)`` (fx graphs show ``x[..., a:b]`` as getitem)."""
        x = node.args[0]
        l = self.lay(x)
        if not isinstance(l, _S):
            raise self.fail(node, "slicing with a per-rank bound")
        args = list(node.args) + [None] * (5 - len(node.args))
        dim, start, end, step = (node.kwargs.get(k, a) for k, a in zip(("dim", "start", "end", "step"), args[1:5]))
        shape = self.ctx.shape(x)
        if (dim or 0) % len(shape) != l.dim:
            return _S(l.dim, l.origins, l.column)
        whole = start in (None, 0) and step in (None, 1) and (end is None or (isinstance(end, int) and end >= shape[l.dim]))
        if not whole:
            raise self.fail(node, "slicing the sharded dimension")
        return _S(l.dim, l.origins, l.column)

    def _select(self, node: fx.Node) -> Any:
        """ATen's ``select(x, dim, index)``: an integer index into one dim."""
        x = node.args[0]
        l = self.lay(x)
        if not isinstance(l, _S):
            raise self.fail(node, "selecting with a per-rank index")
        dim = node.args[1] % len(self.ctx.shape(x))
        if dim == l.dim:
            raise self.fail(node, "integer index into the sharded dimension")
        return _S(l.dim - (1 if dim < l.dim else 0), l.origins)

    def _getitem(self, node: fx.Node) -> Any:
        src, index = node.args[0], node.args[1]
        l = self.lay(src)
        if isinstance(l, tuple):  # a split's outputs
            return l[index] if isinstance(index, int) else self._fail_index(node)
        if isinstance(l, _Shape):
            if isinstance(index, int):
                n = len(self.ctx.meta(src.name))
                return _LocalInt(l.origins) if l.index is not None and index % n == l.index else None
            if isinstance(index, slice):
                n = len(self.ctx.meta(src.name))
                kept = list(range(n))[index]
                return _Shape(kept.index(l.index), l.origins) if l.index in kept else None
            return self._fail_index(node)
        if isinstance(l, _S):
            return self._index_tensor(node, l, index)
        if isinstance(self.lay(index), _LocalInt):
            raise self.fail(node, "indexing with a per-rank size")
        return None

    def _fail_index(self, node: fx.Node) -> Any:
        raise self.fail(node, "unsupported indexing of a sharded value")

    def _index_tensor(self, node: fx.Node, l: _S, index: Any) -> Any:
        ndim = len(self.ctx.shape(node.args[0]))
        items = list(index) if isinstance(index, tuple) else [index]
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in items:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (ndim - consumed))
            else:
                expanded.append(i)
        in_dim = out_dim = 0
        result = None
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if isinstance(i, fx.Node) and self.ctx.is_tensor(i):
                raise self.fail(node, "advanced (tensor) indexing of a sharded value")
            if isinstance(i, slice):
                if in_dim == l.dim:
                    if any(isinstance(v, fx.Node) or v not in (None, 0) for v in (i.start, i.step)) or \
                            (i.stop is not None and not (isinstance(i.stop, int) and i.stop >= self.ctx.shape(node.args[0])[in_dim])):
                        raise self.fail(node, "slicing the sharded dimension")
                    result = out_dim
                in_dim += 1
                out_dim += 1
                continue
            if in_dim == l.dim:
                raise self.fail(node, "integer index into the sharded dimension")
            in_dim += 1
        if result is None:
            result = out_dim + (l.dim - in_dim)
        return _S(result, l.origins, l.column)

    # -- shape ops
    def _map_view(self, node: fx.Node, in_shape: tuple[int, ...], out_shape: tuple[int, ...], d: int,
                  origins: frozenset[str]) -> int:
        groups = _view_groups(in_shape, out_shape)
        if groups is None:
            raise self.fail(node, f"cannot relate view {in_shape} -> {out_shape}")
        for gi, go in groups:
            if d not in gi:
                continue
            gi_eff = [i for i in gi if in_shape[i] != 1]
            go_eff = [o for o in go if out_shape[o] != 1]
            if gi_eff == [d] and go_eff:
                o = go_eff[0]
                if len(go_eff) > 1:
                    self.require(out_shape[o], "heads", node, origins, flexible=False)
                return o
            if len(go_eff) == 1 and gi_eff and gi_eff[0] == d:
                return go_eff[0]
            raise self.fail(node, f"view {in_shape} -> {out_shape} mixes the sharded dim {d} with a more major dim")
        raise self.fail(node, "view lost the sharded dimension")

    def _view(self, node: fx.Node, sizes: bool = True) -> Any:
        """``view``/``reshape`` (``sizes``: its size arguments are rewritten) or a view given by
        dims (``unsqueeze``, ``squeeze``, ``flatten``)."""
        x = node.args[0]
        l = self.lay(x)
        if not isinstance(l, _S):
            raise self.fail(node, "a view's size argument depends on a sharded value")
        in_shape, out_shape = self.ctx.shape(x), self.ctx.shape(node)
        o = self._map_view(node, in_shape, out_shape, l.dim, l.origins)
        if sizes:
            self._rewrite_sizes(node, o, out_shape, l.origins, skip=1)
        return _S(o, l.origins, l.column if in_shape[l.dim] == out_shape[o] else None)

    def _size_entries(self, node: fx.Node, skip: int) -> tuple[tuple[Any, ...], list[Any]] | tuple[None, Any]:
        """(path prefix, entries) of a size list given as varargs or one tuple; (None, node) for a
        shape held by one graph value."""
        args = node.args
        if "size" in node.kwargs or "shape" in node.kwargs:
            key = "size" if "size" in node.kwargs else "shape"
            value = node.kwargs[key]
            if isinstance(value, fx.Node):
                return None, value
            return ("kwargs", key), list(value)
        if len(args) == skip + 1 and isinstance(args[skip], (tuple, list)):
            return ("args", skip), list(args[skip])
        if len(args) == skip + 1 and isinstance(args[skip], fx.Node) and not isinstance(
                self.ctx.meta(args[skip].name), int):
            return None, args[skip]
        return ("args",), list(args[skip:])

    def _rewrite_sizes(self, node: fx.Node, o: int, out_shape: tuple[int, ...], origins: frozenset[str],
                       skip: int, offset: int = 0) -> None:
        """Make entry ``o`` of a size list local (/tp); entries elsewhere must not be per-rank."""
        prefix, entries = self._size_entries(node, skip)
        if prefix is None:
            shape_node = entries
            l = self.lay(shape_node)
            if isinstance(l, _Shape) and l.index == o:
                return
            if l is not None:
                raise self.fail(node, "size tuple mixes per-rank and full sizes", origins)
            self.require(out_shape[o], "features", node, origins)
            self.edit(node, ("args", skip) if shape_node in node.args else ("kwargs", "size"), "div_entry", o)
            return
        base = prefix if prefix[0] == "kwargs" or len(prefix) == 2 else None
        for j, e in enumerate(entries):
            path = (*base, j) if base else ("args", skip + j)
            el = self.lay(e)
            if j - offset == o:
                if isinstance(e, int):
                    if e != -1:
                        self.require(e, "features", node, origins)
                        self.edit(node, path, "set", e // self.ctx.tp, e)
                elif isinstance(el, _LocalInt):
                    pass
                elif isinstance(e, fx.Node):
                    self.require(out_shape[o], "features", node, origins)
                    self.edit(node, path, "div")
            elif isinstance(el, (_LocalInt, _Shape)):
                raise self.fail(node, f"per-rank size used for dim {j - offset}, which is not sharded", origins)

    def _expand(self, node: fx.Node, name: str) -> Any:
        x = node.args[0]
        l = self.lay(x)
        if not isinstance(l, _S):
            raise self.fail(node, "expand to a per-rank size of a replicated tensor")
        out_shape = self.ctx.shape(node)
        o = l.dim + len(out_shape) - len(self.ctx.shape(x))
        if name == "expand_as":
            other = self.lay(node.args[1])
            if not (isinstance(other, _S) and other.dim == o):
                raise self.fail(node, "expand_as onto a tensor sharded differently")
            return _S(o, l.origins)
        self._rewrite_sizes(node, o, out_shape, l.origins, skip=1)
        return _S(o, l.origins, l.column)

    def _permute(self, node: fx.Node, name: str) -> Any:
        x = node.args[0]
        l = self.lay(x)
        ndim = len(self.ctx.shape(x))
        if name == "t":
            return _S(ndim - 1 - l.dim, l.origins, l.column)
        if name == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            dims = [d % ndim for d in dims]
            return _S(dims.index(l.dim), l.origins, l.column)
        a = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim0")
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim1")
        a, b = a % ndim, b % ndim
        return _S({a: b, b: a}.get(l.dim, l.dim), l.origins, l.column)

    def _split(self, node: fx.Node, name: str) -> Any:
        x = node.args[0]
        l = self.lay(x)
        if not isinstance(l, _S):
            raise self.fail(node, f"{name} by a per-rank size")
        ndim = len(self.ctx.shape(x))
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim %= ndim
        pieces = self.ctx.meta(node.name)
        if not isinstance(pieces, (tuple, list)):
            raise self.fail(node, f"{name} without a tuple of outputs")
        if dim != l.dim:
            return tuple(_S(l.dim, l.origins) for _ in pieces)
        if l.column is None or name == "tensor_split":
            raise self.fail(node, f"{name} along the sharded dim of a value that is not a column layer's output")
        sizes = tuple(p.shape[dim] for p in pieces)
        previous = self.columns.get(l.column)
        if previous is not None and previous != sizes:
            raise self.fail(node, f"the output of {l.column} is split twice, as {previous} and {sizes}")
        self.columns[l.column] = sizes
        for s in sizes:
            self.require(s, "features", node, l.origins)
        if name != "chunk":
            arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections",
                                                                           node.kwargs.get("split_size"))
            path = ("args", 1) if len(node.args) > 1 else ("kwargs", "split_size_or_sections" if
                                                           "split_size_or_sections" in node.kwargs else "split_size")
            if isinstance(arg, int):
                self.edit(node, path, "set", arg // self.ctx.tp, arg)
            elif isinstance(arg, (tuple, list)):
                for j, s in enumerate(arg):
                    if not isinstance(s, int):
                        raise self.fail(node, "symbolic split sizes of a fused projection")
                    self.edit(node, (*path, j), "set", s // self.ctx.tp, s)
            else:
                raise self.fail(node, "symbolic split size of a fused projection")
        self.notes.append(f"{self.ctx.linears[l.column]} is a fused projection of {len(sizes)} blocks {sizes}")
        return tuple(_S(l.dim, l.origins) for _ in pieces)

    # -- joins
    def _needs_columns(self, value: fx.Node) -> set[str]:
        """Linear layers (not yet decided) that produce ``value`` through ops only."""
        ctx = self.ctx
        stack, seen, found = [value], set(), set()
        while stack and len(seen) < _MAX_UPSTREAM:
            n = stack.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            if n.name in ctx.linears:
                if n.name not in self.excluded and n.name not in ctx.assigned and n.name not in self.columns \
                        and ctx.style_of(ctx.linears[n.name]) != "replicate":
                    found.add(n.name)
                continue
            if n.op in ("placeholder", "get_attr", "call_module") or n.name in self.layouts:
                continue
            stack.extend(i for i in n.all_input_nodes if ctx.is_tensor(i))
        return found

    def _meet_replicated(self, node: fx.Node, operand: fx.Node, pos: int | None, full: int,
                         origins: frozenset[str]) -> None:
        """A replicated ``operand`` used by ``node`` together with values sharded on its dim ``pos``."""
        ctx = self.ctx
        shape = ctx.shape(operand)
        if pos is None or pos < 0 or shape[pos] == 1:
            if ctx.requires_grad(operand):
                self.insert("copy", operand, node)
            return
        if shape[pos] != full:
            raise self.fail(node, f"replicated operand {operand.name} has size {shape[pos]} on the sharded dim "
                                  f"(expected {full} or 1)", origins)
        wanted = self._needs_columns(operand)
        if wanted:
            raise NeedsColumns(wanted)
        self.require(full, "heads" if len(shape) == 4 and pos == 1 else "features", node, origins)
        self.insert("scatter", operand, node, pos)

    def _pointwise(self, node: fx.Node, name: str) -> Any:
        ctx = self.ctx
        out = ctx.shape(node)
        if out is None:
            raise self.fail(node, f"'{name}' of a sharded value returns a non-tensor")
        operands = [a for a in node.all_input_nodes if ctx.is_tensor(a)]
        sharded = [(a, self.lay(a)) for a in operands if isinstance(self.lay(a), _S)]
        dims = {l.dim + len(out) - len(ctx.shape(a)) for a, l in sharded}
        if len(dims) != 1:
            raise self.fail(node, f"'{name}' combines values sharded on different dims")
        d = dims.pop()
        origins = frozenset().union(*[l.origins for _, l in sharded])
        if any(isinstance(self.lay(a), (_LocalInt, _Shape)) for a in node.all_input_nodes):
            raise self.fail(node, f"'{name}' mixes a sharded tensor with a per-rank size")
        first = node.args[0] if node.args else None
        inplace = (name.endswith("_") and not name.endswith("__")) or name in ("iadd", "imul", "isub", "itruediv")
        if inplace and isinstance(first, fx.Node) and not isinstance(self.lay(first), _S):
            raise self.fail(node, f"in-place '{name}' writes a sharded value into a replicated tensor", origins)
        for a in operands:
            if not isinstance(self.lay(a), _S):
                self._meet_replicated(node, a, d - (len(out) - len(ctx.shape(a))), out[d], origins)
        columns = {l.column for _, l in sharded}
        column = columns.pop() if len(columns) == 1 and len(sharded) == 1 else None
        return _S(d, origins, column)

    def _softmax(self, node: fx.Node) -> Any:
        l = self.lay(node.args[0])
        ndim = len(self.ctx.shape(node.args[0]))
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim is None or dim % ndim == l.dim:
            raise self.fail(node, "softmax over the sharded dimension")
        return _S(l.dim, l.origins)

    def _reduction(self, node: fx.Node) -> Any:
        x = node.args[0]
        other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if op_name(node) in ("max", "min") and self.ctx.is_tensor(other):
            return self._pointwise(node, op_name(node))  # torch.max(a, b): elementwise, not a reduction
        l = self.lay(x)
        if not isinstance(l, _S):
            raise self.fail(node, "reduction with a per-rank argument")
        ndim = len(self.ctx.shape(x))
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dim is None:
            raise self.fail(node, f"'{op_name(node)}' over all dims of a sharded value")
        dims = {d % ndim for d in (dim if isinstance(dim, (tuple, list)) else [dim])}
        if l.dim in dims:
            raise self.fail(node, f"'{op_name(node)}' over the sharded dimension")
        if not isinstance(self.ctx.meta(node.name), self.ctx.TensorMeta):
            raise self.fail(node, f"'{op_name(node)}' returning several values")
        return _S(l.dim if keep else l.dim - sum(1 for d in dims if d < l.dim), l.origins)

    def _cat(self, node: fx.Node) -> Any:
        ctx = self.ctx
        tensors = node.args[0]
        out = ctx.shape(node)
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(out)
        sharded = [self.lay(t) for t in tensors if isinstance(self.lay(t), _S)]
        dims = {l.dim for l in sharded}
        if len(dims) != 1 or dim in dims:
            raise self.fail(node, "concatenation along (or across different) sharded dims")
        d = dims.pop()
        origins = frozenset().union(*[l.origins for l in sharded])
        for t in tensors:
            if isinstance(t, fx.Node) and not isinstance(self.lay(t), _S):
                self._meet_replicated(node, t, d, out[d], origins)
        return _S(d, origins)

    def _matmul(self, node: fx.Node) -> Any:
        ctx = self.ctx
        a, b = node.args[0], node.args[1]
        la, lb = self.lay(a), self.lay(b)
        sa, sb, out = ctx.shape(a), ctx.shape(b), ctx.shape(node)
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            raise self.fail(node, "matmul with a 1-d operand")
        na, nb, no = len(sa), len(sb), len(out)
        origins = frozenset().union(*[l.origins for l in (la, lb) if isinstance(l, _S)])

        def role(l: Any, n: int, is_a: bool) -> tuple[str, int]:
            if not isinstance(l, _S):
                return "R", -1
            if l.dim == n - 1:
                return ("contract" if is_a else "cols"), l.dim
            if l.dim == n - 2:
                return ("rows" if is_a else "contract"), l.dim
            return "batch", l.dim + no - n

        ra, rb = role(la, na, True), role(lb, nb, False)
        if ra[0] == "contract" or rb[0] == "contract":
            raise self.fail(node, "matmul contracts over the sharded dimension (partial sums)", origins)
        if ra[0] == "batch" or rb[0] == "batch":
            d = ra[1] if ra[0] == "batch" else rb[1]
            if ra[0] not in ("batch", "R") or rb[0] not in ("batch", "R") or (ra[0] == rb[0] == "batch" and ra[1] != rb[1]):
                raise self.fail(node, "matmul operands sharded on different dims", origins)
            for operand, r, n in ((a, ra, na), (b, rb, nb)):
                if r[0] == "R":
                    self._meet_replicated(node, operand, d - (no - n), out[d], origins)
            return _S(d, origins)
        if ra[0] == "rows" and rb[0] == "R":
            if ctx.requires_grad(b):
                self.insert("copy", b, node)
            return _S(no - 2, origins)
        if rb[0] == "cols" and ra[0] == "R":
            if ctx.requires_grad(a):
                self.insert("copy", a, node)
            return _S(no - 1, origins)
        raise self.fail(node, "matmul of two operands sharded on rows and columns", origins)

    def _sdpa(self, node: fx.Node) -> Any:
        ctx = self.ctx
        q, k, v = (node.args + (None, None, None))[:3]
        out = ctx.shape(node)
        lq = self.lay(q)
        if not isinstance(lq, _S) or lq.dim != len(out) - 3:
            raise self.fail(node, "scaled_dot_product_attention with the query not sharded on heads")
        d = lq.dim
        if node.kwargs.get("enable_gqa"):
            raise self.fail(node, "scaled_dot_product_attention(enable_gqa=True)")
        for t in (k, v):
            lt = self.lay(t)
            if isinstance(lt, _S):
                if lt.dim != d:
                    raise self.fail(node, "key/value sharded on another dim than the query's heads")
            else:
                self._meet_replicated(node, t, d, out[d], lq.origins)
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node) and not isinstance(self.lay(mask), _S):
            self._meet_replicated(node, mask, d - (len(out) - len(ctx.shape(mask))), out[d], lq.origins)
        return _S(d, lq.origins)

    def _cross_entropy(self, node: fx.Node, logits: fx.Node, target: Any, opts: dict[str, Any]) -> Any:
        l = self.lay(logits)
        shape = self.ctx.shape(logits)
        if not isinstance(l, _S) or l.dim != (1 if len(shape) > 1 else 0):
            raise self.fail(node, "cross-entropy over a value not sharded on its class dim")
        heads = [c for c in l.origins if c in self.columns]
        classes = shape[l.dim]
        if not any(self.ctx.sites[c].out_features == classes for c in heads) or \
                classes not in self.ctx.vocab_sizes:
            raise self.fail(node, f"cross-entropy over {classes} classes that are not the vocabulary of an "
                                  f"input embedding (only LM heads are vocab-parallel)")
        if isinstance(self.lay(target), _S):
            raise self.fail(node, "cross-entropy target is sharded")
        if opts.get("weight") is not None or float(opts.get("label_smoothing", 0.0) or 0.0) != 0.0:
            raise self.fail(node, "vocab-parallel cross-entropy supports no class weights and no label smoothing; "
                                  "map the LM head to 'replicate'")
        reduction = opts.get("reduction", "mean")
        if opts.get("reduce") is not None or opts.get("size_average") is not None:
            raise self.fail(node, "cross-entropy with the deprecated size_average/reduce arguments")
        self.losses[node.name] = {"ignore_index": int(opts.get("ignore_index", -100)), "reduction": reduction}
        self.vocab_head = True
        return None


_ATEN_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def _aten_cross_entropy_options(node: fx.Node) -> dict[str, Any]:
    """``F.cross_entropy`` keyword options of an ``aten.cross_entropy_loss`` node."""
    names = ("weight", "reduction", "ignore_index", "label_smoothing")
    defaults = (None, 1, -100, 0.0)
    args = list(node.args[2:])
    values = {k: (args[i] if i < len(args) else node.kwargs.get(k, d)) for i, (k, d) in enumerate(zip(names, defaults))}
    values["reduction"] = _ATEN_REDUCTIONS.get(values["reduction"], values["reduction"])
    return values


def _view_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up dims of a view ``a -> b`` into groups of equal products."""
    i = j = 0
    groups: list[tuple[list[int], list[int]]] = []
    try:
        while i < len(a) or j < len(b):
            gi, gj, pi, pj = [], [], 1, 1
            if i < len(a):
                pi, gi = a[i], [i]
                i += 1
            if j < len(b):
                pj, gj = b[j], [j]
                j += 1
            while pi != pj:
                if pi < pj:
                    pi *= a[i]
                    gi.append(i)
                    i += 1
                else:
                    pj *= b[j]
                    gj.append(j)
                    j += 1
            # absorb trailing size-1 dims into this group
            while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
                gi.append(i)
                i += 1
            groups.append((gi, gj))
    except IndexError:
        return None
    return groups
