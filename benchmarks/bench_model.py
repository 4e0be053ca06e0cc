"""The one benchmark model and its synthetic data, shared by every pipeline-throughput runner.

Why one module: a throughput comparison only means something if every runner trains the *same*
model on the *same* tokens. Everything that decides the numbers a runner computes — the config,
the seed, the token stream, the loss, and where the model is cut into two stages — lives here,
and runners only wrap these pieces in their framework's API. Each runner's loss at every step
is checked against the single-process run, to catch a runner that silently trains something
else (a wrong cut, a missing position embedding, an untied head, scaled or clipped gradients).

The model is Hugging Face's ``GPT2LMHeadModel`` (8 blocks, hidden 256, 8 heads, sequence 128,
dropout 0, fp32) with a vocabulary of 2048. Why 2048: the LM head and its softmax sit on the
last stage, so their cost decides how unequal the two stages are, and with the benchmark's
fixed cut that imbalance caps every pipelined runner below the physical limit whatever its
schedule. Measured on this machine (one thread, micro-batch 4, forward + backward): one block
0.048 s; head + loss 0.013 s at vocab 1024, 0.029 s at 2048, 0.064 s at 4096, 0.129 s at 8192
(2.7 blocks). At 8192 the last stage does 62 % of the work (stage 0 ≈ 0.20 s, stage 1 ≈ 0.32 s
per micro-batch), which limits any 2-stage pipeline to about 0.75 of the physical limit for
M = 8; at 2048 the last stage does 53 % and 1F1B can reach about 0.85 — close to the 0.89 of
equal stages — while the head is still a real vocabulary projection (0.6 block). Use
``--set vocab_size=8192`` on the benchmark command line to measure the other trade-off.

The two-stage cut is fixed by the benchmark definition, not chosen by a partitioner:
stage 0 = token + position embeddings and blocks 0–3; stage 1 = blocks 4–7, ``ln_f`` and the
LM head, whose weight is the token-embedding matrix (tied). The pieces below are small
``nn.Module`` wrappers over the HF model's own submodules so that each framework can assemble
its stages from them without re-implementing any GPT-2 math.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines one pipeline-throughput measurement.

    ``micro_batch`` × ``num_microbatches`` sequences form one optimizer step (32 by default);
    ``warmup_steps`` are run and discarded before ``steps`` timed steps.
    """

    n_layer: int = 8
    n_embd: int = 256
    n_head: int = 8
    seq_len: int = 128
    vocab_size: int = 2048
    micro_batch: int = 4
    num_microbatches: int = 8
    num_stages: int = 2
    steps: int = 10
    warmup_steps: int = 2
    lr: float = 1e-4
    seed: int = 1234

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch * self.num_microbatches

    @property
    def blocks_per_stage(self) -> int:
        if self.n_layer % self.num_stages:
            raise ValueError(f"n_layer={self.n_layer} does not split evenly into {self.num_stages} stages")
        return self.n_layer // self.num_stages

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "BenchConfig":
        return cls(**json.loads(text))


def build_model(cfg: BenchConfig) -> "GPT2LMHeadModel":  # noqa: F821 (transformers imported lazily)
    """Build the full model from ``cfg.seed``; every runner and every rank calls this.

    Building the whole (10 M-parameter) model on every rank and then keeping only a stage's
    pieces is what guarantees bit-identical initial weights across frameworks, whatever order
    each framework would otherwise construct its layers in. SDPA attention is requested
    explicitly because blocks called outside ``GPT2Model`` receive no attention mask and rely on
    SDPA's implicit causal masking (the eager path would silently attend to the future).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.seq_len,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        use_cache=False,
        bos_token_id=cfg.vocab_size - 1,  # GPT-2's 50256 would lie outside the small vocabulary
        eos_token_id=cfg.vocab_size - 1,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(config)
    model.train()
    return model


def make_batches(cfg: BenchConfig, num_steps: int) -> list[torch.Tensor]:
    """Synthetic token ids, one ``[samples_per_step, seq_len]`` int64 tensor per step.

    Uniform random tokens from a private generator (so model init and data never share RNG
    state). Labels are the inputs themselves; :func:`lm_loss` does the next-token shift.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    shape = (cfg.samples_per_step, cfg.seq_len)
    return [torch.randint(0, cfg.vocab_size, shape, generator=gen) for _ in range(num_steps)]


def microbatches(cfg: BenchConfig, batch: torch.Tensor) -> list[torch.Tensor]:
    """Split one step's batch into ``num_microbatches`` contiguous micro-batches.

    Every framework here splits along dim 0 in order, so micro-batch ``i`` is the same tokens
    everywhere.
    """
    return list(batch.chunk(cfg.num_microbatches, dim=0))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch (what ``GPT2LMHeadModel`` computes)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1, :].reshape(-1, vocab), labels[:, 1:].reshape(-1))


def make_optimizer(params: Iterable[nn.Parameter], cfg: BenchConfig) -> torch.optim.Optimizer:
    """AdamW with one fixed setting for every runner (foreach off: the same kernels everywhere)."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, foreach=False)


# --------------------------------------------------------------------------------------------
# Stage pieces
# --------------------------------------------------------------------------------------------


class TokenEmbedding(nn.Module):
    """The token-embedding matrix as a module of its own, so a stage can own a copy of it.

    Both stages need this matrix (stage 0 to embed, stage 1 as the LM head), so each gets its
    own ``Parameter`` initialised from the same tensor; keeping the copies equal is then a
    matter of summing their gradients across the two stages before every optimizer step
    (DeepSpeed does that for ``TiedLayerSpec``; the other runners do it by hand).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


def tied_lm_head(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """Project hidden states onto the vocabulary with the (tied) token-embedding matrix."""
    return F.linear(hidden, embedding.weight)


class LMHead(nn.Module):
    """Module form of :func:`tied_lm_head`, for frameworks that want a plain layer."""

    def __init__(self, embedding: TokenEmbedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return tied_lm_head(self.embedding, hidden)


class PositionEmbedding(nn.Module):
    """Adds GPT-2's learned position embeddings (positions ``0..seq-1``) to token embeddings."""

    def __init__(self, wpe: nn.Embedding) -> None:
        super().__init__()
        self.wpe = wpe

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        return hidden + self.wpe(positions).unsqueeze(0)


def first_stage_body(model: nn.Module, cfg: BenchConfig) -> list[nn.Module]:
    """Stage 0 after its token embedding: position embedding and the first half of the blocks."""
    return [PositionEmbedding(model.transformer.wpe), *model.transformer.h[: cfg.blocks_per_stage]]


def last_stage_body(model: nn.Module, cfg: BenchConfig) -> list[nn.Module]:
    """Stage 1 before its LM head: the second half of the blocks and the final layer norm."""
    return [*model.transformer.h[cfg.blocks_per_stage :], model.transformer.ln_f]


def stage_module(model: nn.Module, cfg: BenchConfig, stage: int) -> nn.Sequential:
    """The ``nn.Sequential`` of one stage (0 or 1), owning its own copy of the tied matrix.

    Stage 0 maps token ids ``[b, s]`` to hidden states ``[b, s, h]``; stage 1 maps hidden states
    to logits ``[b, s, vocab]``. Use :func:`tied_parameter` to find the copy whose gradient must
    be summed across stages.
    """
    if cfg.num_stages != 2:
        raise ValueError("the benchmark's fixed cut is defined for exactly 2 stages")
    embedding = TokenEmbedding(model.transformer.wte.weight)
    if stage == 0:
        return nn.Sequential(embedding, *first_stage_body(model, cfg))
    if stage == 1:
        return nn.Sequential(*last_stage_body(model, cfg), LMHead(embedding))
    raise ValueError(f"stage must be 0 or 1, got {stage}")


def chunk_module(model: nn.Module, cfg: BenchConfig, chunk: int, num_chunks: int) -> nn.Sequential:
    """Virtual stage ``chunk`` of ``num_chunks`` (``num_stages`` x chunks per rank) for the
    peers' virtual-stage schedules: the blocks split evenly, the first chunk also embeds and
    the last also applies the final layer norm and the (tied) LM head - the fixed cut of
    :func:`stage_module`, refined. Chunks built from one model share one embedding matrix."""
    if cfg.n_layer % num_chunks:
        raise ValueError(f"n_layer={cfg.n_layer} does not split evenly into {num_chunks} chunks")
    per = cfg.n_layer // num_chunks
    embedding = TokenEmbedding(model.transformer.wte.weight)
    body: list[nn.Module] = list(model.transformer.h[chunk * per:(chunk + 1) * per])
    if chunk == 0:
        body = [embedding, PositionEmbedding(model.transformer.wpe), *body]
    if chunk == num_chunks - 1:
        body = [*body, model.transformer.ln_f, LMHead(embedding)]
    return nn.Sequential(*body)


def tied_parameter(stage: nn.Sequential) -> nn.Parameter:
    """The token-embedding copy inside a module built by :func:`stage_module`."""
    for module in stage.modules():
        if isinstance(module, TokenEmbedding):
            return module.weight
    raise ValueError("stage has no TokenEmbedding")
