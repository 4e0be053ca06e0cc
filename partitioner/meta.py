"""Building models without weights, and materializing only the pieces a stage owns.

Why this module exists: a 20B-parameter model must be planned on a laptop and each pipeline rank
must only ever hold its own stage. So models are built with parameters on the ``meta`` device
(shapes and dtypes, no storage), traced and costed there, and a stage later materializes just the
tensors it references.

Two decisions worth knowing:

* :func:`init_empty_weights` puts *parameters* on meta but keeps *buffers* real by default.
  Non-persistent buffers are often computed in ``__init__`` (LLaMA's rotary ``inv_freq``, BERT's
  ``position_ids``) and are tiny; a generic trainer cannot recompute them later, so they are kept.
  (Hugging Face models also recompute them in ``_init_weights``, which :func:`materialize` calls,
  so an all-meta HF model works too.)
* Materialized tensors are initialized by the model's own init (``PreTrainedModel._init_weights``
  or ``reset_parameters()``), with every random draw on a parameter re-seeded from
  ``(seed, canonical parameter name)``. A parameter therefore gets the same value whatever the
  number of pipeline stages, and tied parameters get identical values on every stage.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "init_empty_weights",
    "is_meta_module",
    "first_device",
    "meta_like",
    "materialize",
    "mirror",
    "derive_seed",
    "canonical_parameter_names",
]


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Context manager: every parameter registered inside is created on the ``meta`` device.

    ``with merak.init_empty_weights(): model = AutoModelForCausalLM.from_config(cfg)`` builds a
    model of any size in milliseconds and without memory. Buffers stay on their real device
    unless ``include_buffers=True`` (see the module docstring for why).
    """
    original_register_parameter = nn.Module.register_parameter
    original_register_buffer = nn.Module.register_buffer

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original_register_parameter(module, name, param)
        if param is not None and param.device.type != "meta":
            attrs = dict(param.__dict__)
            meta_param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            meta_param.__dict__.update(attrs)
            module._parameters[name] = meta_param

    def register_buffer(
        module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None:
        original_register_buffer(module, name, tensor, persistent=persistent)
        if tensor is not None:
            module._buffers[name] = module._buffers[name].to("meta")

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    if include_buffers:
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original_register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = original_register_buffer  # type: ignore[method-assign]


def is_meta_module(module: nn.Module) -> bool:
    """True when any parameter or buffer of ``module`` lives on the meta device."""
    return any(t.device.type == "meta" for t in _tensors(module))


def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def first_device(tensors: Iterable[torch.Tensor], default: str = "cpu") -> torch.device:
    """Device of the first tensor in ``tensors`` (``default`` when there is none)."""
    for t in tensors:
        return t.device
    return torch.device(default)


def meta_like(value: Any) -> Any:
    """A meta-device twin of ``value`` (tensors anywhere inside containers); no storage is copied."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return value
        out = torch.empty_strided(
            value.shape, value.stride(), dtype=value.dtype, device="meta"
        )
        return out.requires_grad_(value.requires_grad) if value.is_floating_point() else out
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(meta_like(v) for v in value)
    if isinstance(value, dict):
        return {k: meta_like(v) for k, v in value.items()}
    return value


def canonical_parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(tensor) -> canonical name`` for every parameter and buffer of ``model``.

    The canonical name of a tensor reachable under several names (tied weights such as GPT-2's
    ``lm_head.weight`` / ``transformer.wte.weight``) is the first in ``named_parameters`` order,
    i.e. the same name ``model.state_dict()`` deduplication keeps.
    """
    names: dict[int, str] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(tensor), name)
    for name, tensor in model.named_buffers(remove_duplicate=False):
        names.setdefault(id(tensor), name)
    return names


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed from ``seed`` and a qualified name, stable across processes and runs."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


_RANDOM_INPLACE = frozenset(
    {"normal_", "uniform_", "bernoulli_", "random_", "exponential_", "cauchy_", "log_normal_",
     "geometric_"}
)


class _PerTensorSeeding(TorchFunctionMode):
    """Re-seeds the global RNG before every in-place random draw on a known tensor.

    Model init functions draw from the global RNG in an order that depends on which modules
    exist; keying every draw on the tensor's canonical name makes the result independent of how
    the model is split into stages.
    """

    def __init__(self, seed: int, names_by_ptr: dict[int, str]) -> None:
        super().__init__()
        self.seed = seed
        self.names_by_ptr = names_by_ptr

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _RANDOM_INPLACE:
            # Tensor methods get the tensor positionally, torch.nn.init functions as `tensor=`.
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.device.type != "meta":
                name = self.names_by_ptr.get(target.data_ptr())
                if name is not None:
                    torch.manual_seed(derive_seed(self.seed, name))
        return func(*args, **kwargs)


def _owner_and_ancestors(root: nn.Module, owner_names: Iterable[str]) -> list[str]:
    """Owners plus all their ancestors, in post-order (children before parents, as HF inits)."""
    wanted: set[str] = set()
    for name in owner_names:
        parts = name.split(".") if name else []
        for i in range(len(parts) + 1):
            wanted.add(".".join(parts[:i]))
    order: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            if path in wanted:
                visit(child, path)
        order.append(prefix)

    visit(root, "")
    return order


def _init_module(init_root: nn.Module, path: str, target: nn.Module) -> None:
    """Initialize ``target`` (the module at ``path``) with the model's own init.

    That is the ``_init_weights`` of the closest enclosing Hugging Face ``PreTrainedModel`` along
    ``path`` in ``init_root`` (as HF's ``smart_apply`` dispatches for composite models), else the
    module's ``reset_parameters()``.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()  # type: ignore[assignment,misc]
    hf_model = init_root if isinstance(init_root, PreTrainedModel) else None
    module = init_root
    for part in path.split(".") if path else []:
        module = getattr(module, part)
        if isinstance(module, PreTrainedModel):
            hf_model = module
    if hf_model is not None:
        hf_model._init_weights(target)
    elif callable(getattr(target, "reset_parameters", None)):
        target.reset_parameters()


def materialize(
    root: nn.Module,
    tensor_paths: dict[str, str],
    device: torch.device | str,
    seed: int,
) -> None:
    """Replace meta tensors of ``root`` in place by real ones on ``device`` and initialize them.

    ``tensor_paths`` maps each tensor's qualified name inside ``root`` to its canonical name in
    the original model (used as its RNG key and to keep tied tensors tied: one real tensor is
    created per canonical name). ``root`` is usually a :func:`mirror` of the user's model, so the
    model's own init functions (which receive module objects of the original classes) can run.
    """
    device = torch.device(device)
    real: dict[str, torch.Tensor] = {}
    owners: set[str] = set()
    for path, canonical in tensor_paths.items():
        owner_path, _, attr = path.rpartition(".")
        owner = root.get_submodule(owner_path) if owner_path else root
        store = owner._parameters if attr in owner._parameters else owner._buffers
        current = store[attr]
        if current is None:
            continue
        if current.device.type != "meta":
            if current.device != device:
                moved = current.to(device)
                store[attr] = nn.Parameter(moved, current.requires_grad) if store is owner._parameters else moved
            continue
        owners.add(owner_path)
        if canonical not in real:
            # Poisoned until the model's init writes it, so forgotten tensors are detected.
            empty = _poison(torch.empty(current.shape, dtype=current.dtype, device=device))
            real[canonical] = nn.Parameter(empty, current.requires_grad) if store is owner._parameters else empty
        store[attr] = real[canonical]
    if not owners:
        return
    # A tensor reachable under several paths (tied weights) is initialized last by the module
    # owning its canonical path, so its value never depends on which aliases a stage holds.
    counts = collections.Counter(tensor_paths.values())
    canonical_owners = [c.rpartition(".")[0] for c in real if counts[c] > 1 and c in tensor_paths]
    names_by_ptr = {t.data_ptr(): name for name, t in real.items() if t.numel() > 0}
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
        with _PerTensorSeeding(seed, names_by_ptr):
            for path in [*_owner_and_ancestors(root, owners), *canonical_owners]:
                torch.manual_seed(derive_seed(seed, "module:" + path))
                _init_module(root, path, root.get_submodule(path) if path else root)
    uninitialized = [name for name, t in real.items() if _is_poisoned(t)]
    if uninitialized:
        raise RuntimeError(
            f"{uninitialized} were on the meta device and the model's init (HF _init_weights or "
            "reset_parameters()) did not set them; give their module a reset_parameters() (or build "
            "the model with merak.init_empty_weights(), which keeps buffers real, or with real weights)"
        )


def mirror(model: nn.Module, paths: Iterable[str]) -> nn.Module:
    """A copy of ``model``'s module tree along ``paths`` that can be materialized without touching
    ``model``.

    Every module on a path (and every descendant of a path's last module) is a shallow copy of the
    original: same class and attributes (so ``_init_weights`` recognizes it), but its own
    ``_parameters`` / ``_buffers`` / ``_modules`` dicts. Modules off the paths are shared with the
    original, which is free because they hold meta tensors only and are never materialized.
    A module reached twice (shared submodules) is copied once.
    """
    wanted: set[str] = set()
    subtree_roots: set[str] = set()
    for path in paths:
        parts = path.split(".") if path else []
        for i in range(len(parts)):
            wanted.add(".".join(parts[:i]))
        subtree_roots.add(path)
    memo: dict[int, nn.Module] = {}

    def copy_module(module: nn.Module, prefix: str, whole: bool) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        clone = copy.copy(module)
        memo[id(module)] = clone
        clone.__dict__["_parameters"] = dict(module._parameters)
        clone.__dict__["_buffers"] = dict(module._buffers)
        clone.__dict__["_modules"] = dict(module._modules)
        for name, child in module._modules.items():
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if whole or path in subtree_roots:
                clone._modules[name] = copy_module(child, path, True)
            elif path in wanted:
                clone._modules[name] = copy_module(child, path, False)
        return clone

    return copy_module(model, "", "" in subtree_roots)


def _poison(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.fill_(float("nan"))
    if tensor.dtype == torch.bool:
        return tensor.fill_(False)
    return tensor.fill_(torch.iinfo(tensor.dtype).min)


def _is_poisoned(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0 or tensor.dtype == torch.bool:
        return False
    if tensor.is_floating_point():
        return bool(torch.isnan(tensor).all())
    return bool((tensor == torch.iinfo(tensor.dtype).min).all())
