"""Tiny models built from configs (random init, no hub downloads) for Merak's tests.

Usage::

    from tiny_models import tiny_model, TINY_KINDS          # tests/ is on sys.path under pytest
    model, make_batch = tiny_model("gpt2", n_layer=2)       # config overrides as keywords
    batch = make_batch(batch_size=2, seq_len=8, seed=0)     # dict of tensors, incl. labels
    loss = model(**batch).loss

Every model has hidden size <= 64, <= 4 transformer blocks and dropout 0, so outputs are
deterministic and parity tests can use tight tolerances. ``meta=True`` builds the model with
``merak.partitioner.init_empty_weights`` (parameters on the meta device). ``batch_size`` and
``seq_len`` are free per call; ``device`` places the batch.

Kinds: ``gpt2`` (tied embeddings), ``llama`` (grouped-query attention), ``bert`` (masked LM),
``t5`` (encoder-decoder), ``vit`` (image classifier), ``mlp`` (plain torch: a skip connection
spanning the network and a non-tensor value passed between blocks), ``opt`` and ``bart`` (fx
tracing of BART fails in its top-level forward: these exercise the torch.export graph),
``gemma2`` (a scaled ``nn.Embedding`` subclass tied to the LM head, soft-capped logits),
``mixtral`` (sparse mixture of experts with the router's auxiliary loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["TINY_KINDS", "FAMILY_KINDS", "tiny_model", "tiny_config", "SkipMLP", "tiny_family", "decoder_families", "FamilyUnavailable"]

BatchFn = Callable[..., dict[str, torch.Tensor]]

#: the 4-layer kinds every partitioner parity test runs over
TINY_KINDS = ("gpt2", "llama", "bert", "t5", "vit", "mlp")
#: 2-layer families the tensor-parallel tests add (an export graph, a scaled embedding, MoE)
FAMILY_KINDS = ("opt", "bart", "gemma2", "mixtral")
VOCAB = 96

_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=4, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                 bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1),
    "llama": dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB,
                  attention_dropout=0.0, tie_word_embeddings=False),
    "bert": dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 max_position_embeddings=64, vocab_size=VOCAB, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0),
    "t5": dict(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, d_ff=64, num_heads=4,
               vocab_size=VOCAB, dropout_rate=0.0, relative_attention_num_buckets=8,
               decoder_start_token_id=0, pad_token_id=0),
    "vit": dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                image_size=16, patch_size=4, num_channels=3, num_labels=5, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0),
    "mlp": dict(hidden=32, blocks=4, classes=5),
    "opt": dict(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=64, vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0,
                pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "bart": dict(encoder_layers=2, decoder_layers=2, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                 encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=64,
                 vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
    "gemma2": dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=64, vocab_size=VOCAB,
                   attention_dropout=0.0, pad_token_id=0),
    "mixtral": dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=64, vocab_size=VOCAB, attention_dropout=0.0,
                    router_aux_loss_coef=0.02, output_router_logits=True, tie_word_embeddings=False),
}


def tiny_config(kind: str, **overrides: Any) -> Any:
    """The config object of a tiny model kind (a HF config, or a dict for ``mlp``)."""
    if kind not in _CONFIGS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {TINY_KINDS + FAMILY_KINDS}")
    values = {**_CONFIGS[kind], **overrides}
    if kind == "mlp":
        return values
    import transformers

    config_cls = {
        "gpt2": transformers.GPT2Config,
        "llama": transformers.LlamaConfig,
        "bert": transformers.BertConfig,
        "t5": transformers.T5Config,
        "vit": transformers.ViTConfig,
        "opt": transformers.OPTConfig,
        "bart": transformers.BartConfig,
        "gemma2": transformers.Gemma2Config,
        "mixtral": transformers.MixtralConfig,
    }[kind]
    attn = values.pop("attn_implementation", "eager")
    config = config_cls(**values)
    config._attn_implementation = attn
    return config


def tiny_model(kind: str, meta: bool = False, seed: int = 0, **overrides: Any) -> tuple[nn.Module, BatchFn]:
    """``(model, make_batch)`` for a tiny model of ``kind`` with config ``overrides``.

    ``attn_implementation`` may be passed as an override (default ``"eager"``), and
    ``attention_mask=False`` makes batches without an attention mask (decoders then build their
    causal mask from shapes alone, which the causal-attention rewrite turns into ``is_causal``).
    ``make_batch(batch_size=2, seq_len=8, seed=0, device="cpu")`` returns the model's keyword
    inputs including ``labels``.
    """
    with_mask = overrides.pop("attention_mask", True)
    config = tiny_config(kind, **overrides)
    torch.manual_seed(seed)
    if meta:
        from merak.partitioner import init_empty_weights

        with init_empty_weights():
            model = _build(kind, config)
    else:
        model = _build(kind, config)
    return model, _batch_fn(kind, config, with_mask)


def _build(kind: str, config: Any) -> nn.Module:
    if kind == "mlp":
        return SkipMLP(**config)
    import transformers

    cls = {
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "bert": transformers.BertForMaskedLM,
        "t5": transformers.T5ForConditionalGeneration,
        "vit": transformers.ViTForImageClassification,
        "opt": transformers.OPTForCausalLM,
        "bart": transformers.BartForConditionalGeneration,
        "gemma2": transformers.Gemma2ForCausalLM,
        "mixtral": transformers.MixtralForCausalLM,
    }[kind]
    return cls(config)


def _batch_fn(kind: str, config: Any, with_mask: bool = True) -> BatchFn:
    def make_batch(batch_size: int = 2, seq_len: int = 8, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        if kind == "vit":
            size = config.image_size
            batch = {
                "pixel_values": torch.randn(batch_size, config.num_channels, size, size, generator=g),
                "labels": torch.randint(0, config.num_labels, (batch_size,), generator=g),
            }
        elif kind == "mlp":
            batch = {
                "x": torch.randn(batch_size, seq_len, config["hidden"], generator=g),
                "labels": torch.randint(0, config["classes"], (batch_size,), generator=g),
            }
        else:
            ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=g)
            mask = torch.ones(batch_size, seq_len, dtype=torch.long)
            mask[0, -2:] = 0  # some padding, so masks matter
            batch = {"input_ids": ids, "attention_mask": mask} if with_mask else {"input_ids": ids}
            if kind == "bert":
                labels = torch.full_like(ids, -100)
                labels[:, 1::3] = ids[:, 1::3]
                batch["labels"] = labels
            elif kind in ("t5", "bart"):
                batch["labels"] = torch.randint(1, VOCAB, (batch_size, max(2, seq_len // 2)), generator=g)
            else:
                batch["labels"] = ids.clone()
        return {k: v.to(device) for k, v in batch.items()}

    return make_batch


class SkipMLP(nn.Module):
    """A plain torch model with a long skip connection and a non-tensor value between blocks.

    ``h0`` (the input projection) is added back after the last block, so with one block per
    stage it is forwarded through the middle stages; ``scale`` is a Python float computed from a
    shape in the first block and used in the last (sent as a non-tensor value).
    """

    def __init__(self, hidden: int = 32, blocks: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(hidden, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
            for _ in range(blocks)
        )
        self.head = nn.Linear(hidden, classes)
        self.gain = nn.Parameter(torch.ones(hidden))

    def reset_parameters(self) -> None:
        """Initializes the parameters this module owns directly (children reset themselves)."""
        nn.init.ones_(self.gain)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h0 = torch.tanh(self.inp(x))
        h = h0
        scale = None
        for i, block in enumerate(self.blocks):
            h = h + block(h)
            if i == 0:
                scale = 1.0 / h.shape[-1] ** 0.5  # Python value derived from an activation
        h = (h + h0) * self.gain * scale
        logits = self.head(h.mean(dim=1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


# ---- every decoder family of the installed transformers --------------------------------------------
#: config fields shrunk wherever a family's config has them (names differ between families)
_FAMILY_SIZES: dict[str, Any] = dict(
    hidden_size=32, n_embd=32, d_model=32, dim=32, num_hidden_layers=2, n_layer=2, num_layers=2,
    num_attention_heads=4, n_head=4, num_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
    ffn_dim=64, n_inner=64, d_ff=64, dff=64, vocab_size=VOCAB, max_position_embeddings=64, n_positions=64,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, num_local_experts=4, num_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=0, decoder_layers=2, decoder_ffn_dim=64,
    decoder_attention_heads=4, encoder_layers=2, encoder_ffn_dim=64, encoder_attention_heads=4,
    # multi-head latent attention (DeepSeek V2/V3 and their kin)
    kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, qk_head_dim=12, v_head_dim=8,
    n_heads=4, n_layers=2, max_window_layers=2, n_group=1, topk_group=1, index_head_dim=8, index_n_heads=4,
    rotary_dim=4,
)


class FamilyUnavailable(RuntimeError):
    """The family's tiny model cannot be built or does not run a plain training step on one
    process: nothing tensor parallelism could be blamed for."""


def tiny_family(model_type: str, seed: int = 0) -> tuple[nn.Module, BatchFn]:
    """``(model, make_batch)``: the causal-LM class of ``model_type`` from its default config with
    every size field shrunk (``_FAMILY_SIZES``), dropout off and eager attention; its batch is
    token ids with a padded attention mask and ``labels``. :class:`FamilyUnavailable` if it cannot
    be built or its single-process loss is not finite."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config_cls = CONFIG_MAPPING[model_type]
        defaults = config_cls()
        values = {k: v for k, v in _FAMILY_SIZES.items() if hasattr(defaults, k)}
        if hasattr(defaults, "use_cache"):  # training never caches; linear-attention caches refuse masks
            values["use_cache"] = False
        if hasattr(defaults, "attention_types"):  # GPT-Neo: one (global, local) pair for the two layers
            values["attention_types"] = [[["global", "local"], 1]]
        if hasattr(defaults, "mamba_n_heads") and hasattr(defaults, "mamba_expand"):  # heads must divide expand*hidden
            values["mamba_n_heads"] = 4
        if hasattr(defaults, "kv_lora_rank"):  # latent attention expands keys per query head: no grouping
            values["num_key_value_heads"] = values.get("num_attention_heads", 4)
            values["head_dim"] = values.get("qk_rope_head_dim", 4)  # MLA configs mean the rotary part by head_dim
        values.update({k: 0.0 for k, v in vars(defaults).items() if ("dropout" in k or k.endswith("pdrop")) and isinstance(v, float)})
        values.update({k: i for i, k in enumerate(("pad_token_id", "bos_token_id", "eos_token_id"))
                       if isinstance(getattr(defaults, k, None), int) and getattr(defaults, k) >= VOCAB})
        config = _build_config(config_cls, values)
        config._attn_implementation = "eager"
        _refuse_untiny(model_type, config)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        make_batch = _batch_fn("llama", config)
        with torch.no_grad():
            loss = model(**make_batch(batch_size=2, seq_len=8)).loss
        if loss is None or not torch.isfinite(loss):
            raise FamilyUnavailable(f"{model_type}: the tiny model's loss is {loss}")
    except FamilyUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to build or run is the family's, not TP's
        raise FamilyUnavailable(f"{model_type}: {type(exc).__name__}: {exc}") from exc
    return model, make_batch


#: A "tiny" model above this many parameters kept sizes the shrinker did not reach (e.g. a nested
#: text_config): building it for real took ~20 GB (llama4's defaults are 108e9 parameters).
MAX_TINY_PARAMETERS = 100_000_000


def _refuse_untiny(model_type: str, config: Any) -> None:
    """:class:`FamilyUnavailable` when ``config`` is not tiny, counted on the meta device (free)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if count > MAX_TINY_PARAMETERS:
        raise FamilyUnavailable(f"{model_type}: the shrunk config still has {count / 1e6:.0f}M parameters "
                                f"(sizes in a nested config the shrinker does not reach); not built")


def _build_config(config_cls: Any, values: dict[str, Any]) -> Any:
    """``config_cls(**values)``, dropping a size field the error names (a derived property such as
    Falcon's ``head_dim``) and retrying."""
    values = dict(values)
    while True:
        try:
            return config_cls(**values)
        except Exception as exc:  # noqa: BLE001 - configs validate in many ways
            named = [k for k in values if k in _FAMILY_SIZES and f"'{k}'" in str(exc)]
            if not named:
                raise
            values.pop(named[0])


def decoder_families() -> list[str]:
    """Every ``model_type`` with a causal-LM head in the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
