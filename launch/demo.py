"""The Merak demo: train a small GPT-2 with pipeline parallelism on CPU, export it, sample from it.

A Hugging Face model, unmodified, built on the meta device so each rank materializes only its own
pipeline stage; trained by ``merak.MerakTrainer`` (a ``transformers.Trainer``) on Python's own
documentation (``pydoc_data``) with a byte-level BPE tokenizer trained on first run; exported as
a plain ``save_pretrained`` directory, which rank 0 reloads with ``AutoModelForCausalLM`` to
generate text. No network, no GPU needed. Run it with any launcher::

    merak-run --nproc 2 --module merak.launch.demo --pp 2
    torchrun --nproc-per-node 2 -m merak.launch.demo --pp 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import merak
from merak.launch.demo_data import SEQ_LEN, build_datasets, load_tokenizer

PROMPT = "The for statement"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command line; the deepspeed launcher's ``--local_rank`` is accepted and unused.

    Strict otherwise: a mistyped option fails instead of silently training with defaults.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dp", type=int, default=1, help="data-parallel degree")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=2, help="pipeline stages")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--micro-batch-size", type=int, default=4, help="samples per micro-batch")
    p.add_argument("--microbatches", type=int, default=4,
                   help="micro-batches per step per data-parallel replica")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default: 10%% of --steps)")
    p.add_argument("--schedule", default="1f1b",
                   choices=("gpipe", "1f1b", "shifted_critical_path", "zero_bubble"))
    p.add_argument("--recompute", default="none", choices=("none", "full", "stage_aware"))
    p.add_argument("--layers", type=int, default=6, help="GPT-2 blocks")
    p.add_argument("--hidden", type=int, default=256, help="GPT-2 hidden size")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=60, help="length of the generated sample")
    p.add_argument("--output-dir", type=Path,
                   default=Path(tempfile.gettempdir()) / "merak-demo",
                   help="trainer output; the exported model goes to OUTPUT_DIR/model")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model(vocab_size: int, eos_id: int, args: argparse.Namespace):
    """An unmodified ``GPT2LMHeadModel`` with its parameters on the meta device.

    Built under ``merak.init_empty_weights()`` so that no rank ever allocates the whole model: the
    trainer materializes only the parameters of the local stage.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=SEQ_LEN, n_embd=args.hidden,
                        n_layer=args.layers, n_head=args.heads, resid_pdrop=args.dropout,
                        embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    with merak.init_empty_weights():
        return GPT2LMHeadModel(config)


def sample_text(model_dir: Path, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    """Reload the export with plain Hugging Face and continue ``prompt``.

    Going through ``from_pretrained`` (not the in-memory stages) is the point: it proves the
    export is a complete, ordinary HF checkpoint.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=40,
                             temperature=0.8, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    grid = merak.init(dp=args.dp, tp=args.tp, pp=args.pp)
    is_main = grid.rank == 0

    def say(message: str) -> None:
        if is_main:
            print(f"[merak demo] {message}", flush=True)

    start = time.perf_counter()
    tokenizer = load_tokenizer()  # first run: one rank trains it, the others wait for the file
    train_ds, eval_ds = build_datasets(tokenizer, seed=args.seed)
    model = build_model(len(tokenizer), tokenizer.eos_token_id, args)
    global_batch = args.micro_batch_size * args.microbatches * args.dp
    say(f"layout dp={args.dp} tp={args.tp} pp={args.pp} on {grid.dims.world_size} ranks; "
        f"GPT-2 {args.layers} layers, hidden {args.hidden}, vocab {len(tokenizer)}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters (built on meta)")
    say(f"data: {len(train_ds)} train / {len(eval_ds)} eval blocks of {SEQ_LEN} tokens; global "
        f"batch {global_batch} = micro-batch {args.micro_batch_size} × {args.microbatches} "
        f"micro-batches × dp {args.dp}; {args.steps} steps, schedule {args.schedule}")

    targs = merak.MerakArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.microbatches,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else args.steps // 10,
        weight_decay=0.01,
        logging_steps=args.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=args.seed,
        schedule=args.schedule,
        recompute=args.recompute,
    )
    trainer = merak.MerakTrainer(model, targs, train_dataset=train_ds, eval_dataset=eval_ds)
    train_start = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - train_start
    metrics = trainer.evaluate()
    logged = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    say(f"trained {result.global_step} steps in {train_seconds:.0f} s "
        f"({time.perf_counter() - start:.0f} s with setup and evaluation): logged loss "
        f"{logged[0]:.3f} -> {logged[-1]:.3f}, eval loss {metrics['eval_loss']:.3f}")

    export_dir = args.output_dir / "model"
    trainer.save_model(str(export_dir))  # HF format: one safetensors shard per stage + index
    if is_main:
        tokenizer.save_pretrained(export_dir)  # so the export is self-contained for HF users
        say(f"exported to {export_dir}")
        text = sample_text(export_dir, tokenizer, PROMPT, args.max_new_tokens, args.seed)
        say(f"sample (HF generate from the export):\n{text}")
    merak.shutdown()


if __name__ == "__main__":
    main()
