"""Hugging Face export written by the stages in parallel: one safetensors shard per stage.

Why: gathering the whole model on rank 0 (the previous export) needs one host with the memory of
the full model and writes one file at one rank's speed. Here each stage's first rank (dp 0,
tp 0; tensor-parallel shards are first gathered inside the stage's TP group, where only the TP
code knows how fused blocks were split) writes ``model-0000k-of-0000n.safetensors`` with its own
tensors, and rank 0 writes ``model.safetensors.index.json`` (the weight map HF's
``from_pretrained`` reads) and the config. No rank ever holds more than its stage.

Names are the ones ``save_pretrained`` would write: a tie group (GPT-2's ``lm_head.weight`` /
``transformer.wte.weight``) is stored once, under the name HF keeps (not one of the model's
``_tied_weights_keys``), by the first stage holding it. A single writing stage writes the plain
``model.safetensors`` (HF's name for an unsharded checkpoint).
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

__all__ = ["hf_names", "stage_export_tensors", "shard_file_name", "write_shard", "write_index"]

HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"


def _alias_groups(module: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = collections.defaultdict(list)
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        groups[id(tensor)].append(name)
    return list(groups.values())


def hf_names(model: nn.Module) -> dict[str, str]:
    """Every tensor name of ``model`` -> the name its tie group is saved under, as HF's
    ``save_pretrained`` chooses it (the first name that is not a declared tied-weight key)."""
    patterns: list[str] = []
    try:
        from transformers.modeling_utils import _get_tied_weight_keys

        patterns = list(_get_tied_weight_keys(model)) if hasattr(model, "config") else []
    except (ImportError, AttributeError, TypeError):  # a plain nn.Module, or an older transformers
        patterns = []
    persistent = set(model.state_dict().keys())
    out: dict[str, str] = {}
    for names in _alias_groups(model):
        saved = [n for n in names if n in persistent] or names
        kept = [n for n in sorted(saved) if not any(re.search(p, n) for p in patterns)]
        target = kept[0] if kept else saved[0]
        out.update({name: target for name in names})
    return out


def stage_export_tensors(state: dict[str, torch.Tensor], names: dict[str, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(``{HF name: tensor}`` once per tie group, stage keys the model does not have) from a
    stage's full (TP-gathered) state dict."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        if key not in names:
            unknown.append(key)
        else:
            out.setdefault(names[key], tensor)
    return out, unknown


def shard_file_name(index: int, count: int) -> str:
    """HF's name of shard ``index`` (0-based) of ``count``; one shard is ``model.safetensors``."""
    return HF_WEIGHTS_FILE if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor],
                unique: Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], Any]]) -> None:
    stored, _ = unique(tensors)
    save_file(stored, str(path), metadata={"format": "pt"})


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    path.write_text(json.dumps({"metadata": {"total_size": total_size},
                                "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
