"""Module state that a ``forward`` writes while it is being traced.

Why this exists: some models assign to their own attributes inside ``forward`` - CTRL does
``self.pos_encoding = self.pos_encoding.to(device=..., dtype=...)`` on every call. Under symbolic
tracing the assigned value is a proxy, so without care the trace leaves a proxy where the user's
buffer was: the next trace or cost pass reads it back and builds on a finished graph (CTRL's
cost pass never ended), and the user's own model is broken after ``merak.partitioner.trace``.

A traced graph is a pure function of the batch and the weights: it reads each buffer through a
``get_attr`` and cannot carry a value from one step to the next. So the trace must leave the
model exactly as it found it, and a write that would matter across steps must be refused:

* a *cast* of the attribute's own value (``to``/``type``/``float``/``contiguous``/... of the
  same buffer) changes nothing a later step would see - each stage runs on one device and
  dtype - and is accepted;
* any other write (a counter, a cache, a running statistic computed in ``forward``) would be
  silently dropped, so :func:`check_state_writes` raises a :class:`TraceError` naming the module
  attribute and the fix: keep that module opaque with ``leaf_modules`` (a leaf runs its real
  ``forward``, writes included).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

__all__ = ["StateWrite", "restoring_module_state", "check_state_writes", "unrecorded"]

#: methods whose result equals their receiver up to device, dtype or memory layout
_CASTS = frozenset({"to", "type", "float", "double", "half", "bfloat16", "contiguous", "detach", "clone", "cpu", "cuda"})


@dataclasses.dataclass(frozen=True)
class StateWrite:
    """``module_path.attribute`` was assigned ``value`` (a traced value) during the trace."""

    module_path: str
    attribute: str
    module_type: str
    value: Any

    @property
    def qualified_name(self) -> str:
        return f"{self.module_path}.{self.attribute}" if self.module_path else self.attribute


def _holds_proxy(value: Any) -> bool:
    return any(isinstance(leaf, fx.Proxy) for leaf in pytree.tree_leaves(value))


#: ``nn.Module``'s own tables in ``__dict__``: a proxy in ``_buffers`` is the buffer's write, not theirs
_REGISTRIES = frozenset({"_buffers", "_parameters", "_modules"})

#: > 0 while a leaf module runs under ``torch.func.functional_call``, which undoes its writes itself
_unrecorded_depth = 0


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Writes inside this block are not the traced forward's: a leaf module computing its meta
    value through ``functional_call`` (which puts the module's state back on exit)."""
    global _unrecorded_depth
    _unrecorded_depth += 1
    try:
        yield
    finally:
        _unrecorded_depth -= 1


def _traced(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or _holds_proxy(value)


@contextlib.contextmanager
def restoring_module_state(model: nn.Module) -> Iterator[list[StateWrite]]:
    """Record every tensor or traced value assigned to an attribute of ``model``'s modules while
    the block runs, put the old values back on exit and report the writes in the yielded list
    (filled on exit, exception or not).

    Assignments are seen through ``nn.Module.__setattr__`` (non-strict torch.export undoes them
    itself and records nothing) and, for fx proxies that bypass it, by comparing each module's
    attributes with a snapshot.
    """
    paths = {id(module): path for path, module in model.named_modules()}
    snapshots = {id(module): (module, dict(module.__dict__), dict(module._buffers)) for module in model.modules()}
    assigned: dict[tuple[int, str], Any] = {}
    original_setattr = nn.Module.__setattr__

    def recording_setattr(module: nn.Module, name: str, value: Any) -> None:
        if not _unrecorded_depth and id(module) in paths and _traced(value):
            assigned[(id(module), name)] = value
        original_setattr(module, name, value)

    nn.Module.__setattr__ = recording_setattr  # type: ignore[method-assign]
    writes: list[StateWrite] = []
    try:
        yield writes
    finally:
        nn.Module.__setattr__ = original_setattr  # type: ignore[method-assign]
        for key, (module, attributes, buffers) in snapshots.items():
            for table, before in ((module._buffers, buffers), (module.__dict__, attributes)):
                for name, value in list(table.items()):
                    if table is module.__dict__ and name in _REGISTRIES:
                        continue  # the buffer/parameter/submodule tables themselves, not attributes
                    if _holds_proxy(value) or (key, name) in assigned and value is not before.get(name):
                        assigned[(key, name)] = value
                        if name in before:
                            table[name] = before[name]
                        else:
                            del table[name]
        for (key, name), value in assigned.items():
            module = snapshots[key][0]
            writes.append(StateWrite(paths[key], name, type(module).__name__, value))


def _is_cast_of_itself(write: StateWrite) -> bool:
    """Whether the written value is a chain of casts ending at a read of the same attribute."""
    if not isinstance(write.value, fx.Proxy):
        return False
    node = write.value.node
    while node.op == "call_method" and node.target in _CASTS:
        node = node.args[0]
    return node.op == "get_attr" and node.target == write.qualified_name


def check_state_writes(writes: list[StateWrite], model_name: str) -> list[str]:
    """Notes for accepted writes (casts of the attribute's own value); :class:`TraceError` for
    any other, naming the attribute and the ``leaf_modules`` fix."""
    from .tracer import TraceError

    refused = [w for w in writes if not _is_cast_of_itself(w)]
    if refused:
        names = ", ".join(f"{w.qualified_name} ({w.module_type})" for w in refused)
        leaves = tuple(dict.fromkeys(w.module_path for w in refused if w.module_path))
        fix = (f"pass leaf_modules={leaves!r} so that module runs its real forward on its stage"
               if leaves else "wrap the state update in a submodule and pass it in leaf_modules")
        raise TraceError(f"{model_name}.forward assigns module state computed in forward: {names}. A traced "
                         f"stage reads module state but cannot carry it to the next step, so the update would "
                         f"be lost; {fix}")
    return [f"ignored a cast of {w.qualified_name} assigned in forward (a stage keeps it on its own device/dtype)"
            for w in writes]
