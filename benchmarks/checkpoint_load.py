"""One process's checkpoint load: time and peak host-memory growth, optionally profiled (issue 18).

A quick, single-process companion of ``benchmarks/checkpoint_io.py`` (which runs 4 ranks and the
old implementation too): a GPT-2 of ``--layers`` blocks and width ``--hidden`` on one stage,
AdamW states initialised (one step on zero gradients), saved once with
``merak.checkpoint.save_checkpoint`` and loaded ``--repeats`` times with ``load_checkpoint``
into the same stage and optimizer (as a resume does). ``--profile`` prints the ``cProfile`` of
one more load, sorted by cumulative time.

Usage (from the repository root)::

    python benchmarks/checkpoint_load.py                 # 6 layers, hidden 512 (44.7M parameters)
    python benchmarks/checkpoint_load.py --profile
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import merak
    from benchmarks.checkpoint_io import measure
    from merak.checkpoint import load_checkpoint, save_checkpoint
    from merak.partitioner import build_stage, init_empty_weights, shard, trace

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    grid = merak.init()
    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=max(1, args.hidden // 64), n_positions=128)
    with init_empty_weights():
        model = GPT2LMHeadModel(config)
    batch = {"input_ids": torch.zeros(1, 16, dtype=torch.long), "labels": torch.zeros(1, 16, dtype=torch.long)}
    stage = build_stage(shard(trace(model, batch), 1, method="uniform"), 0, seed=0)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    for p in stage.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    ckpt = Path(tempfile.mkdtemp(prefix="merak-ckpt-load-")) / "checkpoint"
    save_checkpoint(ckpt, stage=stage, grid=grid, optimizer=optimizer)
    params = sum(p.numel() for p in stage.parameters())

    def load() -> None:
        load_checkpoint(ckpt, stage=stage, grid=grid, optimizer=optimizer)

    for _ in range(args.repeats):
        seconds, growth = measure(load)
        print(f"GPT-2 {args.layers} layers hidden {args.hidden} ({params / 1e6:.1f}M parameters + AdamW states): "
              f"load {seconds:.2f} s, peak host growth {growth:.0f} MiB")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(load)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
    merak.shutdown()


if __name__ == "__main__":
    main()
