"""Tracing a model into a torch.fx graph on the meta device, without allocating weights.

Why a custom tracer: ``torch.fx.symbolic_trace`` knows nothing about values, so any Python
control flow on a shape (``if x.shape[1] > 1``), ``len()``, tuple unpacking of sizes or ``**kwargs``
forwarding - all over Hugging Face code - stops it. :class:`MetaTracer` carries, next to every
proxy, the value the node would have on the meta device (shapes and dtypes, no data). Control flow
and ``len``/iteration are answered from those values, while sizes that flow *into* ops stay
symbolic graph nodes, so the graph does not specialize on batch size or sequence length (only the
branches taken are baked in). Dtypes are specialized (``x.dtype`` is the traced dtype); devices
are not (``x.device`` stays symbolic, so a graph traced on meta runs on any device).

Why leaf modules: ``nn.Linear``, HF ``Conv1D``, ``nn.Embedding``, norms ... stay ``call_module``
nodes. Tensor parallelism finds its column/row pairs through them, and stages keep the original
parameter names through them.

Why a ``torch.export`` fallback: some code paths need real tensors (``isinstance(x, Tensor)``,
custom autograd functions, ...). Non-strict export traces them with fake tensors; its graph is an
ATen-level graph whose parameters keep their fully-qualified names. It specializes on the example
shapes unless dynamic dimensions can be derived, which is reported in ``TracedGraph.notes``.

The result is a :class:`TracedGraph`: an fx graph whose placeholders are the keys of the example
batch, whose ``get_attr``/``call_module`` targets are paths in the *original* model (no weights are
copied), plus the tensor constants the trace created.

Limits of the fx flavour (inherent to symbolic tracing): a proxy is not a ``torch.Tensor``, so
code that silently branches on ``isinstance(x, torch.Tensor)`` takes the non-tensor branch; and a
Python ``int()``/``len()`` of a size bakes that size in (reported in ``notes`` as "specialized").
A graph has no grad mode: a value computed inside the model's own ``torch.no_grad()`` is recorded
followed by ``detach()``, which gives the same values and gradients. Writes to module state in
``forward`` are undone after the trace (:mod:`.module_state`). The graph is a training graph: it is
traced in ``train()`` mode without KV cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import operator
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches
from torch.utils import _pytree as pytree

from .export_regions import inline_grad_mode_regions, refuse_autocast_regions
from .meta import first_device, is_meta_module, meta_like
from .module_state import check_state_writes, restoring_module_state, unrecorded

logger = logging.getLogger(__name__)

__all__ = ["TraceError", "TracedGraph", "MetaTracer", "trace_graph", "default_leaf_types", "is_expert_bank", "resolve_path"]

LeafSpec = type | str


class TraceError(RuntimeError):
    """A model could not be traced. The message names the failing op or module and the fix."""


@dataclasses.dataclass
class TracedGraph:
    """An fx graph of a model plus what is needed to run pieces of it.

    ``graph`` placeholders are named after the example-batch keys; ``get_attr`` and
    ``call_module`` targets are qualified names in ``model``; ``constants`` holds tensors the trace
    created (fx: targets ``_merak_constant<i>``). The output node returns a flat
    ``{name: value}`` dict. ``flavour`` is ``"fx"`` or ``"export"``; ``dynamic`` says whether batch
    size and sequence length stay symbolic; ``notes`` lists specializations and fallbacks;
    ``trace_devices`` are devices an export graph has baked in (retargeted per stage).
    """

    model: nn.Module
    graph: fx.Graph
    flavour: str
    constants: dict[str, torch.Tensor]
    input_names: tuple[str, ...]
    example_inputs: dict[str, Any]
    dynamic: bool
    notes: list[str] = dataclasses.field(default_factory=list)
    trace_devices: tuple[str, ...] = ()


def default_leaf_types() -> tuple[type, ...]:
    """Module types that are always leaves (besides everything in ``torch.nn``)."""
    types: list[type] = []
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return tuple(types)


def is_expert_bank(module: nn.Module) -> bool:
    """Whether ``module`` is a mixture-of-experts *bank*: every expert's weights stacked in 3-D
    parameters (``gate_up_proj`` or ``up_proj``, and ``down_proj``, first dim ``num_experts``), as
    transformers' MoE models store them (Mixtral, Qwen-MoE, OLMoE, ...).

    Why it matters here: a bank's forward routes tokens with data-dependent control flow (fx
    cannot trace it) and tensor parallelism must replace it as a whole (its weights sharded per
    expert or experts spread over ranks), so the tracer keeps it as one opaque node.
    """
    experts = getattr(module, "num_experts", None)
    if not isinstance(experts, int):
        return False
    up = module._parameters.get("gate_up_proj", module._parameters.get("up_proj"))
    down = module._parameters.get("down_proj")
    return all(p is not None and p.dim() == 3 and p.shape[0] == experts for p in (up, down))


def resolve_path(root: Any, target: str) -> Any:
    """The attribute at dotted path ``target`` under ``root`` (a submodule, parameter or buffer)."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fmt_target(target: Any) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module and name else repr(target)


def _value_of(x: Any) -> Any:
    """The meta value behind ``x`` (proxies anywhere inside containers are resolved)."""
    if isinstance(x, fx.Proxy):
        return x.node.meta["merak_value"]
    if isinstance(x, fx.Node):
        return x.meta["merak_value"]
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_value_of(v) for v in x)
    if isinstance(x, tuple):  # namedtuple
        return type(x)(*(_value_of(v) for v in x))
    if isinstance(x, dict):
        return {k: _value_of(v) for k, v in x.items()}
    if isinstance(x, slice):
        return slice(_value_of(x.start), _value_of(x.stop), _value_of(x.step))
    return x


class _MetaProxyMixin:
    """Answers the Python protocols fx cannot (``len``, ``int``, ``in``) from the meta value."""

    node: fx.Node
    tracer: "MetaTracer"

    def _merak_value(self) -> Any:
        return self.node.meta["merak_value"]

    def __len__(self) -> int:
        value = self._merak_value()
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                raise self.tracer._error(self.node, "len() of a 0-d tensor")
            self.tracer._note_specialization(self.node, f"len() of a tensor = {len(value)}")
        return len(value)

    def _concrete(self, kind: type) -> Any:
        value = self._merak_value()
        if isinstance(value, torch.Tensor):
            self.tracer._data_dependent(self.node, f"{kind.__name__}() of a tensor")
        self.tracer._note_specialization(self.node, f"{kind.__name__}() = {value!r}")
        return kind(value)

    def __int__(self) -> int:
        return self._concrete(int)

    def __index__(self) -> int:
        return self._concrete(int)

    def __float__(self) -> float:
        return self._concrete(float)

    def __contains__(self, item: Any) -> bool:
        value = self._merak_value()
        if isinstance(value, torch.Tensor):
            self.tracer._data_dependent(self.node, "'in' on a tensor")
        return _value_of(item) in value

    def __setitem__(self, key: Any, value: Any) -> None:
        # In-place writes (``ids[..., 1:] = x``) are recorded as ``operator.setitem`` nodes.
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __getattr__(self, k: str) -> Any:
        # Specialize attributes that are static for a trace; keep shapes and devices symbolic.
        if k in ("dtype", "ndim", "layout", "is_sparse"):
            value = self._merak_value()
            if isinstance(value, torch.Tensor):
                return getattr(value, k)
        return _MetaAttribute(self, k)


class _MetaProxy(_MetaProxyMixin, fx.Proxy):
    pass


class _MetaAttribute(_MetaProxyMixin, fx.proxy.Attribute):
    pass


def _first_user_frame_of(exc: BaseException) -> str:
    """``file:line in function`` of the innermost non-torch frame of ``exc``'s traceback."""
    here = os.path.abspath(__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if os.path.abspath(f.filename) != here and f"{os.sep}torch{os.sep}" not in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "<unknown>"


def _first_user_frame() -> str:
    """``file:line in function`` of the innermost model-code frame (not torch internals)."""
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()[:-2]):
        if os.path.abspath(frame.filename) == here or f"{os.sep}torch{os.sep}" in frame.filename:
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "<unknown>"


_COMPUTING_KINDS = ("call_function", "call_method", "call_module")


def _differentiable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


class MetaTracer(fx.Tracer):
    """fx tracer that propagates meta values alongside proxies (see the module docstring).

    ``leaf_modules`` are module types, class names or qualified module names that are kept as
    ``call_module`` nodes in addition to the defaults (all of ``torch.nn``, HF ``Conv1D`` and
    mixture-of-experts banks, see :func:`is_expert_bank`).
    """

    def __init__(self, leaf_modules: Sequence[LeafSpec] = ()) -> None:
        super().__init__(autowrap_modules=(math,))
        self.proxy_buffer_attributes = True
        self.leaf_types = default_leaf_types() + tuple(x for x in leaf_modules if isinstance(x, type))
        self.leaf_names = {x for x in leaf_modules if isinstance(x, str)}
        self.constants: dict[str, torch.Tensor] = {}
        self._constant_ids: dict[int, str] = {}
        self._meta_state_cache: dict[int, dict[str, torch.Tensor]] = {}
        self.placeholder_values: dict[str, Any] = {}
        self.specializations: list[str] = []
        self._module_path_stack: list[str] = []

    # ---- leaves -------------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if isinstance(m, self.leaf_types) or is_expert_bank(m):
            return True
        if module_qualified_name in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        path = (self.submodule_paths or {}).get(m)
        if path is None:
            # A module created inside forward (``loss_fct = CrossEntropyLoss()``): it owns no
            # state the graph could reference, so its code is traced inline.
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
                raise TraceError(
                    f"{type(m).__name__} is created inside forward at {_first_user_frame()} and "
                    "holds parameters; register it as a submodule in __init__"
                )
            return forward(*args, **kwargs)
        self._module_path_stack.append(f"{path} ({type(m).__name__})")
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._module_path_stack.pop()

    # ---- roots and placeholders --------------------------------------------------------------
    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # type: ignore[override]
        """Placeholders are the example-batch keys; ``concrete_args`` are fixed keyword values.

        Calling ``forward`` by keyword sidesteps fx's handling of ``**kwargs`` signatures.
        """
        names = list(self.placeholder_values)
        fixed = dict(concrete_args or {})
        proxies = [self.create_proxy("placeholder", name, (), {}) for name in names]

        def call_forward(root: nn.Module, *values: Any) -> Any:
            return root_fn(root, **dict(zip(names, values)), **fixed)

        return call_forward, [self.root, *proxies]

    # ---- proxies carrying meta values ----------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _MetaProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # type: ignore[override]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr)
        node = proxy.node
        node.meta["merak_module"] = self._module_path_stack[-1] if self._module_path_stack else ""
        # Running a module must not re-enter the tracer's patched nn.Module.__call__; reverting
        # the patches costs a class-attribute write, so it is done only where needed.
        patched = kind == "call_module" or (kind == "get_attr" and target not in self.constants)
        with _maybe_revert_all_patches() if patched else contextlib.nullcontext():
            node.meta["merak_value"] = self._compute_value(node, kind, target, args, kwargs)
        if not torch.is_grad_enabled() and kind in _COMPUTING_KINDS and _differentiable(node.meta["merak_value"]) \
                and not (kind == "call_method" and target == "detach"):
            # inside the model's own ``torch.no_grad()`` (HRM runs all but its last reasoning cycles
            # so): a graph has no grad mode, so the value leaves the region detached instead
            return self.create_proxy("call_method", "detach", (proxy,), {})
        return proxy

    def _compute_value(self, node: fx.Node, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.placeholder_values[target]
        if kind == "get_attr":
            return meta_like(self._attr(target))
        margs, mkwargs = _value_of(args), _value_of(kwargs)
        try:
            if kind == "call_function":
                return target(*margs, **mkwargs)
            if kind == "call_method":
                return getattr(margs[0], target)(*margs[1:], **mkwargs)
            if kind == "call_module":
                return run_module_on_meta(self.root.get_submodule(target), margs, mkwargs, self._meta_state_cache)
        except TraceError:
            raise
        except Exception as exc:  # the op itself failed on meta values
            raise self._error(node, f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError(kind)

    def _attr(self, target: str) -> Any:
        return self.constants[target] if target in self.constants else resolve_path(self.root, target)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, fx.Proxy):
            return a.node
        # Keep tensors created during the trace as our own constants instead of setattr on the
        # user's model (what fx does by default).
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter):
            if id(a) in self._constant_ids:
                return self.create_proxy("get_attr", self._constant_ids[id(a)], (), {}).node
            known = any(a is b for _, b in self.root.named_buffers()) or any(a is v for v in self.tensor_attrs)
            if not known:
                name = f"_merak_constant{len(self.constants)}"
                self.constants[name] = a
                self._constant_ids[id(a)] = name
                return self.create_proxy("get_attr", name, (), {}).node
        if type(a).__module__ == "numpy" and hasattr(a, "item") and getattr(a, "ndim", None) == 0:
            # a NumPy scalar (CTRL scales embeddings by np.sqrt(d)): fx would print it as
            # ``np.float64(...)`` into code that has no ``np``; torch promotes it as the Python number
            return a.item()
        return super().create_arg(a)

    # ---- Python protocols on proxies --------------------------------------------------------
    def to_bool(self, obj: fx.Proxy) -> bool:
        value = _value_of(obj)
        if isinstance(value, torch.Tensor):
            self._data_dependent(obj.node, "control flow on a tensor value")
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = _value_of(obj)
        if isinstance(value, torch.Tensor):
            length = value.shape[0]
            self._note_specialization(obj.node, f"iteration over dim 0 (= {length})")
        elif isinstance(value, dict):
            return iter(list(value.keys()))
        else:
            length = len(value)
        return (obj[i] for i in range(length))

    def keys(self, obj: fx.Proxy) -> Any:
        value = _value_of(obj)
        if isinstance(value, dict):
            return list(value.keys())
        return super().keys(obj)

    # ---- diagnostics --------------------------------------------------------------------------
    def _note_specialization(self, node: fx.Node, what: str) -> None:
        self.specializations.append(f"{what} at {_first_user_frame()}")

    def _where(self) -> str:
        return self._module_path_stack[-1] if self._module_path_stack else "the model's forward"

    def _error(self, node: fx.Node, reason: str) -> TraceError:
        module = self._where()
        leaf_hint = module.split(" (")[-1].rstrip(")") if self._module_path_stack else None
        hint = (
            f"; pass leaf_modules=({leaf_hint!r},) to keep module {module} as one opaque node"
            if leaf_hint
            else ""
        )
        return TraceError(
            f"cannot trace op {_fmt_target(node.target)!s} ({node.name}) in module {module} at "
            f"{_first_user_frame()}: {reason}{hint}"
        )

    def _data_dependent(self, node: fx.Node, what: str) -> None:
        raise self._error(node, f"data-dependent {what} (values are unknown on the meta device)")


def run_module_on_meta(
    module: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any], cache: dict[int, dict[str, torch.Tensor]] | None = None
) -> Any:
    """Run ``module`` with meta stand-ins for its parameters and buffers (no weights touched).

    If the module cannot run on meta values (data-dependent code inside a user leaf module), it is
    run once on zeros on the CPU, so leaf modules are the escape hatch for untraceable code.
    """
    key = id(module)
    state = cache.get(key) if cache is not None else None
    if state is None:
        state = {
            name: meta_like(t)
            for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        }
        if cache is not None:
            cache[key] = state
    try:
        with unrecorded():
            return torch.func.functional_call(module, state, tuple(args), dict(kwargs), tie_weights=False, strict=False)
    except Exception as meta_exc:
        if not any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves((args, kwargs))):
            raise
        zeros = pytree.tree_map_only(torch.Tensor, _zeros_on_cpu, (tuple(args), dict(kwargs)))
        cpu_state = {name: _zeros_on_cpu(t) for name, t in state.items()}
        try:
            with unrecorded():
                out = torch.func.functional_call(module, cpu_state, zeros[0], zeros[1], tie_weights=False, strict=False)
        except Exception:
            raise meta_exc
        return meta_like(out)


def _zeros_on_cpu(t: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(t.shape, dtype=t.dtype, device="cpu")
    return out.requires_grad_(t.requires_grad) if t.is_floating_point() else out


# ---- entry points -------------------------------------------------------------------------------

HF_FIXED_KWARGS = {"use_cache": False}


def _fixed_kwargs(model: nn.Module, names: Sequence[str]) -> dict[str, Any]:
    """Keyword arguments pinned for tracing: no KV cache (a training graph has none)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in HF_FIXED_KWARGS.items() if k in params and k not in names}


def _flatten_outputs(graph: fx.Graph) -> tuple[str, ...]:
    """Rewrite the output node so the graph returns a flat ``{name: value}`` dict."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    value = out.args[0]
    if isinstance(value, dict):
        flat = {str(k): v for k, v in value.items()}
    elif isinstance(value, (tuple, list)):
        flat = {f"output_{i}": v for i, v in enumerate(value)}
    else:
        flat = {"output": value}
    out.args = (flat,)
    return tuple(flat)


@contextlib.contextmanager
def _autograd_functions_as_nodes(tracer: "MetaTracer") -> Iterator[None]:
    """Record ``SomeFunction.apply(...)`` on traced values as one ``call_function`` node.

    Why: symbolic tracing would otherwise run the custom function's ``forward`` on proxies and
    record its ops, silently dropping its hand-written ``backward`` (PhiMoE's sparse-mixer router
    gradient). The node calls the original ``apply``, so stages keep the custom backward.
    """
    original = torch.autograd.Function.__dict__["apply"]  # the classmethod object
    callers: dict[type, Callable[..., Any]] = {}

    def caller(cls: type) -> Callable[..., Any]:
        # a plain function of this module as the node's target: fx's code generator refers to
        # torch's own callables by import path, which would name Function.apply, not cls's
        if cls not in callers:
            def call(*args: Any, **kwargs: Any) -> Any:
                return cls.apply(*args, **kwargs)

            call.__name__ = call.__qualname__ = f"apply_{cls.__name__}"
            callers[cls] = call
        return callers[cls]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if any(isinstance(a, fx.Proxy) for a in pytree.tree_leaves((args, kwargs))):
            return tracer.create_proxy("call_function", caller(cls), args, kwargs)
        return original.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.autograd.Function.apply = original  # type: ignore[method-assign]


def trace_with_fx(model: nn.Module, example_inputs: Mapping[str, Any], leaf_modules: Sequence[LeafSpec] = ()) -> TracedGraph:
    """Trace with :class:`MetaTracer`. Raises :class:`TraceError` naming the failing op/module."""
    tracer = MetaTracer(leaf_modules)
    tracer.placeholder_values = {k: meta_like(v) for k, v in example_inputs.items()}
    fixed = _fixed_kwargs(model, list(example_inputs))
    try:
        # grad mode on: inside, grad mode off means the model's own no_grad regions (see create_proxy)
        with _autograd_functions_as_nodes(tracer), restoring_module_state(model) as state_writes, torch.enable_grad():
            graph = tracer.trace(model, concrete_args=fixed)
    except TraceError:
        raise
    except Exception as exc:
        where = f"in module {tracer._where()}" if tracer._module_path_stack else "in its top-level forward"
        leaf = tracer._where().split(" (")[-1].rstrip(")") if tracer._module_path_stack else None
        hint = f"; pass leaf_modules=({leaf!r},) to keep it as one opaque node" if leaf else ""
        raise TraceError(
            f"fx tracing of {type(model).__name__} failed {where} at {_first_user_frame_of(exc)}: "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from exc
    _flatten_outputs(graph)
    notes = [f"specialized: {s}" for s in dict.fromkeys(tracer.specializations)]
    notes += check_state_writes(state_writes, type(model).__name__)
    return TracedGraph(
        model=model,
        graph=graph,
        flavour="fx",
        constants=tracer.constants,
        input_names=tuple(example_inputs),
        example_inputs=dict(example_inputs),
        dynamic=True,
        notes=notes,
    )


def _export_dynamic_shapes(model: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Dims 0 (batch) and 1 (sequence) of every tensor input as ``Dim.AUTO``, keyed the way
    ``torch.export`` wants: by parameter name, with ``**kwargs`` entries nested under its name."""
    from torch.export import Dim

    params = inspect.signature(model.forward).parameters
    var_kw = next((p.name for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    spec: dict[str, Any] = {}
    for name, value in kwargs.items():
        dims = None
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            dims = {d: Dim.AUTO for d in range(min(value.dim(), 2))}
        if name in params or var_kw is None:
            spec[name] = dims
        else:
            spec.setdefault(var_kw, {})[name] = dims
    return spec


def trace_with_export(model: nn.Module, example_inputs: Mapping[str, Any]) -> TracedGraph:
    """Trace with non-strict ``torch.export`` into an ATen-level graph (the fallback flavour).

    Batch and sequence dims are exported as dynamic (``Dim.AUTO``); if export can only succeed
    with static shapes the graph is specialized to the example shapes, which ``dynamic=False``
    and ``notes`` report. Export's 0/1 specialization means a dynamic graph is valid for sizes
    >= 2. Devices baked into the graph (the trace device) are rewritten to the stage device when a
    stage is built.
    """
    names = list(example_inputs)
    fixed = _fixed_kwargs(model, names)
    on_meta = is_meta_module(model)
    inputs = {k: (meta_like(v) if on_meta else _concrete_like(v, first_device([*model.parameters(), *model.buffers()]))) for k, v in example_inputs.items()}
    kwargs = {**inputs, **fixed}
    notes: list[str] = []
    errors: list[str] = []
    exported = None
    for dynamic in (True, False):
        shapes = _export_dynamic_shapes(model, kwargs) if dynamic else None
        try:
            with _swapped_to_meta(model) if on_meta else contextlib.nullcontext(), \
                    restoring_module_state(model) as state_writes:
                exported = torch.export.export(model, (), kwargs=kwargs, strict=False, dynamic_shapes=shapes)
            break
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{'dynamic' if dynamic else 'static'} shapes: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if exported is None:
        raise TraceError(f"torch.export of {type(model).__name__} failed ({'; '.join(errors)})")
    mutated = sorted({*exported.graph_signature.buffers_to_mutate.values(), *(w.qualified_name for w in state_writes)})
    if mutated:  # the stage graph keeps user outputs only: the update would be silently lost
        raise TraceError(f"torch.export of {type(model).__name__}: forward updates module state {', '.join(mutated)}, "
                         f"which a traced stage cannot carry to the next step")
    if not dynamic:
        notes.append(
            "torch.export graph is specialized to the example shapes "
            + ", ".join(f"{k}={tuple(v.shape)}" for k, v in example_inputs.items() if isinstance(v, torch.Tensor))
            + f" (dynamic export failed: {errors[0]})"
        )
    unlifted = exported.module()
    graph = _clean_export_graph(unlifted.graph, names, fixed, exported, type(model).__name__)
    trace_devices = {v.device for v in inputs.values() if isinstance(v, torch.Tensor)}
    constants = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            value = resolve_path(unlifted, node.target)
            if not _is_model_tensor(model, node.target):
                constants[node.target] = value
    return TracedGraph(
        model=model,
        graph=graph,
        flavour="export",
        constants=constants,
        input_names=tuple(names),
        example_inputs=dict(example_inputs),
        dynamic=dynamic,
        notes=notes,
        trace_devices=tuple(sorted(str(d) for d in trace_devices)),
    )


def _concrete_like(value: Any, device: torch.device) -> Any:
    """A real zero tensor standing in for a meta example input (export of a real model)."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return torch.zeros(value.shape, dtype=value.dtype, device=device)
    return value


@contextlib.contextmanager
def _swapped_to_meta(model: nn.Module) -> Iterator[None]:
    """Temporarily replace every real parameter/buffer of ``model`` by a meta twin.

    Export needs one device; a model from ``init_empty_weights`` has meta parameters but real
    buffers. Shared tensors map to one twin so export still sees ties.
    """
    saved: list[tuple[dict, str, Any]] = []
    twins: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or t.device.type == "meta":
                    continue
                if id(t) not in twins:
                    twin = meta_like(t)
                    twins[id(t)] = nn.Parameter(twin, t.requires_grad) if isinstance(t, nn.Parameter) else twin
                saved.append((store, name, t))
                store[name] = twins[id(t)]
    try:
        yield
    finally:
        for store, name, t in saved:
            store[name] = t


def _is_model_tensor(model: nn.Module, target: str) -> bool:
    try:
        value = resolve_path(model, target)
    except AttributeError:
        return False
    return isinstance(value, torch.Tensor)


def _clean_export_graph(graph: fx.Graph, names: Sequence[str], fixed: Mapping[str, Any], exported: Any,
                        model_name: str = "the model") -> fx.Graph:
    """Make an unlifted export graph look like a MetaTracer graph.

    Inlines grad-mode regions (``no_grad`` bodies become ``detach()``-ed data flow, so every node
    is costed, cut and retargeted; see :mod:`.export_regions`) and refuses autocast regions,
    drops the input-guard module and tensor-metadata asserts (they pin the trace device), turns
    pinned keyword placeholders into constants, and makes the output a flat ``{name: value}``
    dict using export's output pytree spec.
    """
    inline_grad_mode_regions(graph, model_name)
    refuse_autocast_regions(graph, model_name)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.target not in names:
            value = fixed.get(node.target)
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
            graph.erase_node(node)
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    structured = pytree.tree_unflatten(leaves, exported.call_spec.out_spec)
    out.args = (structured,)
    _flatten_outputs(graph)
    graph._codegen = fx.graph.CodeGen()
    graph.lint()
    return graph


FLAVOURS = ("auto", "fx", "export")


def trace_graph(
    model: nn.Module,
    example_inputs: Mapping[str, Any],
    leaf_modules: Sequence[LeafSpec] = (),
    flavour: str = "auto",
) -> TracedGraph:
    """Trace ``model`` called as ``model(**example_inputs)``: fx first, ``torch.export`` as fallback.

    ``flavour="fx"`` or ``"export"`` forces one path. When every path fails the error carries
    each path's reason; the fx reason names the failing op and module and suggests
    ``leaf_modules``.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise TypeError("example_inputs must be a non-empty dict of the model's keyword inputs")
    was_training = model.training
    model.train()  # the graph is a training graph (dropout active, no KV cache)
    try:
        if flavour == "export":
            return trace_with_export(model, example_inputs)
        try:
            return trace_with_fx(model, example_inputs, leaf_modules)
        except TraceError as fx_error:
            if flavour == "fx":
                raise
            logger.info("fx tracing failed (%s); falling back to torch.export", fx_error)
            try:
                traced = trace_with_export(model, example_inputs)
            except TraceError as export_error:
                raise TraceError(f"{fx_error}\n(torch.export fallback also failed: {export_error})") from fx_error
            traced.notes.insert(0, f"fx tracing failed, used torch.export: {fx_error}")
            return traced
    finally:
        model.train(was_training)
