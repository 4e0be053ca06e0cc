"""Merak: automated 3D parallelism for unmodified PyTorch and Hugging Face models.

Two changed lines turn a ``transformers.Trainer`` script into a 3D-parallel one::

    import merak
    merak.init(dp=2, tp=1, pp=2)
    trainer = merak.MerakTrainer(model, merak.MerakArguments(...), train_dataset=ds)

Heavy submodules (transformers, the partitioner) are imported on first use so that
``import merak`` stays cheap in launcher processes.
"""

from __future__ import annotations

import importlib
from typing import Any

from merak.initialize import get_device, get_grid, init, shutdown

__version__ = "0.1.0"

_LAZY = {
    "init_empty_weights": "merak.partitioner.meta",
    "MerakArguments": "merak.arguments",
    "MerakTrainer": "merak.trainer",
}

__all__ = ["init", "get_grid", "get_device", "shutdown", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'merak' has no attribute {name!r}")
