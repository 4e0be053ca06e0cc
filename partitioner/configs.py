"""From a config (``model_type`` + overrides, or a ``config.json``) to a weightless model and inputs.

Why: planning a 20B model must not need its weights, a hub download, or a GPU. The CLI and the
benchmark describe models the way Hugging Face configs do (``gpt2 n_layer=48 n_embd=1600``),
build them under :func:`init_empty_weights` and trace them with meta example inputs of a
realistic training shape (batch 1, sequence = the model's context length, capped at 2048).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .meta import init_empty_weights

__all__ = ["parse_overrides", "load_config", "build_model", "example_inputs", "default_seq_len"]

def _heads(config: Any) -> list[str]:
    """Auto classes to try, the natural training head first: seq2seq LM for encoder-decoders,
    masked LM for encoders (BERT also has a causal-LM class, which is not how it trains),
    causal LM otherwise; then image classification and the bare model."""
    import transformers

    order = ["AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM",
             "AutoModelForImageClassification", "AutoModel"]
    masked = type(config) in transformers.AutoModelForMaskedLM._model_mapping
    if getattr(config, "is_encoder_decoder", False):
        order.insert(0, order.pop(1))
    elif masked and not getattr(config, "is_decoder", False):
        order.insert(0, order.pop(2))
    return order


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["n_layer=48", "tie_word_embeddings=false"]`` -> ``{"n_layer": 48, ...}`` (JSON values)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"config override {item!r} is not of the form key=value")
        overrides[key] = _parse_value(value)
    return overrides


def load_config(spec: Sequence[str]) -> Any:
    """A HF config from ``[model_type_or_config_json, key=value, ...]``."""
    if not spec:
        raise ValueError("--config needs a model_type (e.g. gpt2) or a path to a config.json")
    import transformers

    head, overrides = spec[0], parse_overrides(spec[1:])
    if os.path.exists(head):
        path = os.path.join(head, "config.json") if os.path.isdir(head) else head
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"{path} has no 'model_type'")
        values.update(overrides)
        return _complete(transformers.AutoConfig.for_model(model_type, **values))
    try:
        return _complete(transformers.AutoConfig.for_model(head, **overrides))
    except ValueError as exc:
        raise ValueError(f"unknown model_type {head!r} (and no such config file): {exc}") from exc


def _complete(config: Any) -> Any:
    """Fill what a bare config lacks for a training forward: an encoder-decoder shifts labels
    right by ``decoder_start_token_id`` (the pad token for T5-style models)."""
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0
    return config


def build_model(config: Any, attn_implementation: str | None = "sdpa") -> nn.Module:
    """The model with the most common training head for ``config``, parameters on meta."""
    import transformers

    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    for name in _heads(config):
        auto = getattr(transformers, name)
        if type(config) in auto._model_mapping:
            with init_empty_weights():
                try:
                    return auto.from_config(config)
                except ValueError:
                    if attn_implementation is None:
                        raise
                    config._attn_implementation = "eager"
                    return auto.from_config(config)
    raise ValueError(f"no model class for config {type(config).__name__}")


def default_seq_len(config: Any, cap: int = 2048) -> int:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    return min(512, cap)


def example_inputs(model: nn.Module, batch_size: int = 1, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """Meta example inputs (with labels, so the loss is part of the graph) for ``model``."""
    config = model.config
    seq = seq_len or default_seq_len(config)
    meta = torch.device("meta")
    if getattr(config, "model_type", "") and "pixel_values" in _forward_args(model):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        channels = getattr(config, "num_channels", 3)
        return {
            "pixel_values": torch.empty(batch_size, channels, size, size, device=meta),
            "labels": torch.empty(batch_size, dtype=torch.long, device=meta),
        }
    ids = torch.empty(batch_size, seq, dtype=torch.long, device=meta)
    inputs = {"input_ids": ids, "attention_mask": torch.empty_like(ids)}
    if "labels" in _forward_args(model):
        inputs["labels"] = torch.empty_like(ids)
    return inputs


def _forward_args(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
