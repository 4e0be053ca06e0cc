"""Checkpoint I/O per rank: save / load / HF-export time and peak host memory, old vs new (issue 18).

"old" is Merak's previous implementation (per-rank safetensors / ``torch.save`` files for resume,
the whole model gathered on rank 0 for the HF export), loaded from git at ``--old-rev``; "new"
is the current one (``torch.distributed.checkpoint`` for resume, one safetensors shard per stage
for the export). Model: GPT-2 with ``--layers`` blocks (24 by default) of width ``--hidden``,
cut into ``--pp`` stages of equal block counts, AdamW states initialised (one step on zero gradients), fp32 on CPU.

Peak host memory is the largest resident-set growth of each rank *during* the operation
(``/proc/self/statm`` sampled every 2 ms, minus the size just before): what the operation itself
costs on top of training, e.g. the old export's full model on rank 0.

Usage (from the repository root)::

    python benchmarks/checkpoint_io.py                      # 24 layers, hidden 512, pp=4
    python benchmarks/checkpoint_io.py --hidden 1024        # GPT-2 medium size
    python benchmarks/checkpoint_io.py --quick --out-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
OLD_REV = "e6f0de6"  # main just before issue 18: per-rank files, gather-on-rank-0 export


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], Any]) -> tuple[float, float]:
    """(seconds, peak resident-set growth in MiB) of ``fn()`` in this process."""
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    return elapsed, (peak[0] - base) / 2**20


def _old_module(rev: str, workdir: Path) -> Any:
    source = subprocess.run(["git", "show", f"{rev}:merak/checkpoint.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = workdir / "merak_checkpoint_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("merak_checkpoint_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, workdir: str, queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel

    import merak
    import merak.checkpoint as new
    from merak.partitioner import build_stage, init_empty_weights, shard, trace

    torch.set_num_threads(1)
    grid = merak.init(pp=args.pp)
    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=max(1, args.hidden // 64), n_positions=128)
    with init_empty_weights():
        model = GPT2LMHeadModel(config)
    batch = {"input_ids": torch.zeros(1, 16, dtype=torch.long), "labels": torch.zeros(1, 16, dtype=torch.long)}
    stage = build_stage(shard(trace(model, batch), args.pp, method="uniform"), grid.stage_id, seed=0)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    for p in stage.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    old = _old_module(args.old_rev, Path(workdir))
    root = Path(workdir)
    rows = []
    for impl, module in (("new", new), ("old", old)):  # new first: the old export fills `model` on rank 0
        ckpt, export = root / f"ckpt-{impl}", root / f"export-{impl}"
        ops = {
            "save": lambda: module.save_checkpoint(ckpt, stage=stage, grid=grid, optimizer=optimizer),
            "load": lambda: module.load_checkpoint(ckpt, stage=stage, grid=grid, optimizer=optimizer),
            "export": lambda: module.export_pretrained(export, stage=stage, grid=grid, model=model),
        }
        for op, fn in ops.items():
            dist.barrier()
            seconds, peak_mib = measure(fn)
            dist.barrier()
            rows.append((impl, op, rank, seconds, peak_mib))
        if rank == 0:
            size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**20
            rows.append((impl, "checkpoint_mib", 0, size, 0.0))
    stage_params = sum(p.numel() for p in stage.parameters())
    queue.put((rank, rows, stage_params))
    dist.barrier()
    merak.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--old-rev", default=OLD_REV)
    parser.add_argument("--quick", action="store_true", help="8 layers of width 128 (CI-sized)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden = 8, 128
    from benchmarks.common import markdown_table, write_markdown_report

    workdir = Path(tempfile.mkdtemp(prefix="merak-ckpt-io-"))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, args.pp, port, args, str(workdir), queue)) for r in range(args.pp)]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=5))
        except Exception:  # noqa: BLE001 - queue.Empty: is anyone still running?
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    for p in procs:
        p.join(timeout=120)
    shutil.rmtree(workdir, ignore_errors=True)
    rows, params = [], {}
    sizes = {}
    for rank, rank_rows, stage_params in sorted(results):
        params[rank] = stage_params
        for impl, op, r, seconds, peak in rank_rows:
            if op == "checkpoint_mib":
                sizes[impl] = seconds
            else:
                rows.append((op, impl, r, f"{seconds:.2f}", f"{peak:.0f}"))
    rows.sort()
    body = (f"GPT-2, {args.layers} layers, hidden {args.hidden}, pp={args.pp} (one process per stage, gloo, "
            f"fp32, AdamW states), parameters per stage: {[params[r] for r in sorted(params)]}.\n"
            f"Checkpoint size on disk: old {sizes.get('old', 0):.0f} MiB, new {sizes.get('new', 0):.0f} MiB.\n\n"
            + markdown_table(["operation", "implementation", "rank", "seconds", "peak host MiB (growth)"], rows)
            + "\n\nold = per-rank files + export gathered on rank 0 (commit " + args.old_rev + "); "
            "new = torch.distributed.checkpoint + one export shard per stage. The 2-core machine is shared, "
            "so seconds are noisy; the memory column is what each operation adds on top of training.\n")
    out = args.out_dir / "checkpoint_io.md"
    write_markdown_report(out, "Checkpoint I/O: save / load / export per rank, old vs new", body,
                          packages=("torch", "safetensors"), argv=argv)
    print(out.read_text())


if __name__ == "__main__":
    main()
