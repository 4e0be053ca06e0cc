"""One-GPU check of the CUDA paths CPU tests cannot reach; writes ``benchmarks/results/gpu_check.md``.

Every test of the project runs gloo on CPU. This script runs, on one CUDA device, what a single
GPU allows (about 5 minutes on an H100)::

    python benchmarks/gpu_check.py            # on a machine with a GPU
    python benchmarks/gpu_check.py --dry-run  # anywhere: prints what it would run, measures nothing

Checks (each PASS / FAIL / SKIP / INFO with its figures in the report):

* ``trainer``: MerakTrainer at dp=tp=pp=1 on a small GPT-2 in fp32, bf16 and fp16, 20 steps;
  bf16 and fp16 losses within 1 % of fp32 at every step;
* ``sdpa``: a traced LLaMA stage whose causal mask the partitioner rewrote into SDPA's
  ``is_causal`` dispatches to the flash or memory-efficient kernel (kernel names from the profiler);
* ``device-rule``: under a real NCCL process group the distributed layer picks the current CUDA
  device and its scalar reductions work there;
* ``calibration``: ``calibrate_device("cuda")`` against the matching preset (peak, bandwidth);
* ``offload``: forward+backward of a linear stack with activations offloaded on the side stream,
  against no offload and against the copies alone (the hidden fraction of the copy time);
* ``pipeline-2proc``: the smoke job at pp=2 on the GPUs present; skipped on one GPU (NCCL
  refuses two ranks on one device), with that reason;
* ``memory-estimator``: the estimator's stage total against ``torch.cuda.max_memory_allocated``
  of a real step, per recompute mode (none, full, selective), within 10 %.

No figure in the report comes from anywhere but the GPU it names; without CUDA the script
refuses to run (exit 2) unless ``--dry-run``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DEFAULT_OUT = HERE / "results" / "gpu_check.md"
STEPS = 20


@dataclass(frozen=True)
class Result:
    status: str  # PASS, FAIL, SKIP or INFO
    detail: str


@dataclass(frozen=True)
class Check:
    name: str
    plan: str  # what it runs, printed by --dry-run
    run: Callable[[], Result]


# ---- the checks -------------------------------------------------------------------------------
def _gpt2(seed: int = 0) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=8, vocab_size=2048, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _token_dataset(n: int, seq: int = 128) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 2048, (n, seq), generator=g)]


def _train_curve(precision: str) -> list[float]:
    import merak

    merak.init(dp=1, tp=1, pp=1)
    try:
        args = merak.MerakArguments(output_dir="/tmp/merak-gpu-check", per_device_train_batch_size=8,
                                    gradient_accumulation_steps=4, max_steps=STEPS, logging_steps=1,
                                    learning_rate=1e-3, seed=7, report_to="none", save_strategy="no",
                                    disable_tqdm=True, bf16=precision == "bf16", fp16=precision == "fp16")
        trainer = merak.MerakTrainer(_gpt2(), args, train_dataset=_token_dataset(8 * 4 * STEPS))
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]
    finally:
        merak.shutdown()


def check_trainer() -> Result:
    curves = {p: _train_curve(p) for p in ("fp32", "bf16", "fp16")}
    worst = {p: max(abs(a - b) / abs(b) for a, b in zip(curves[p], curves["fp32"])) for p in ("bf16", "fp16")}
    ok = all(len(c) == STEPS for c in curves.values()) and max(worst.values()) <= 0.01
    detail = (f"{STEPS} steps; last loss fp32 {curves['fp32'][-1]:.4f}, bf16 {curves['bf16'][-1]:.4f}, "
              f"fp16 {curves['fp16'][-1]:.4f}; worst relative step difference bf16 {worst['bf16']:.2%}, "
              f"fp16 {worst['fp16']:.2%} (limit 1%)")
    return Result("PASS" if ok else "FAIL", detail)


def check_sdpa() -> Result:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from merak.partitioner import build_stage, shard, trace

    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=2048, max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    batch = {"input_ids": torch.randint(0, 2048, (4, 1024))}
    stage = build_stage(shard(trace(model, batch), 1), 0, device="cuda")
    rewrites = dict(stage.fusions)
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # as bf16 training runs it
        stage(cuda_batch, {})
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            stage(cuda_batch, {})
            torch.cuda.synchronize()
    kernels = sorted({e.name for e in prof.events() if "attention" in e.name.lower() or "flash" in e.name.lower()
                      or "fmha" in e.name.lower()})
    fast = [k for k in kernels if "flash" in k.lower() or "efficient" in k.lower() or "fmha" in k.lower()]
    ok = bool(rewrites.get("causal-attention")) and bool(fast)
    return Result("PASS" if ok else "FAIL",
                  f"causal-attention rewrites: {rewrites.get('causal-attention', 0)}; attention kernels: "
                  f"{', '.join(kernels[:4]) or 'none found'}")


def check_device_rule() -> Result:
    import torch
    import torch.distributed as dist

    import merak
    from merak.runtime.distributed import groups
    from merak.runtime.distributed.p2p import P2P, wait_with_timeout, waits_on_host

    merak.init()
    try:
        device = groups.device()
        # With one rank the layer's collectives return at once (nobody to talk to), so the real
        # NCCL call is made here, on the device the layer picked: NCCL rejects any other.
        t = torch.tensor([1.5, 2.5], dtype=torch.float64, device=device)
        work = dist.all_reduce(t, async_op=True)
        wait_with_timeout(work, 60, "the GPU check's all-reduce", device=device)  # untimed on CUDA
        reduced = t.tolist()
        p2p = P2P.for_grid(merak.get_grid(), merak.get_device())
        ok = (device == torch.device("cuda", torch.cuda.current_device()) and reduced == [1.5, 2.5]
              and not waits_on_host(device) and p2p.sends_with_payload)
        return Result("PASS" if ok else "FAIL",
                      f"backend {dist.get_backend()}: group device {device}; one-rank NCCL all-reduce there "
                      f"gave {reduced}; CUDA waits left to the process group: {not waits_on_host(device)}; "
                      f"p2p payload sends grouped with the receives: {p2p.sends_with_payload}")
    finally:
        merak.shutdown()


def check_calibration() -> Result:
    import torch

    from merak.planner.cluster import DEVICE_PRESETS, calibrate_device

    name = torch.cuda.get_device_name()
    preset_key = next((k for k in DEVICE_PRESETS if k.split("-")[0] in name.lower()), None)
    fitted = calibrate_device(name, device="cuda", dtype="bfloat16").device
    if preset_key is None:
        return Result("INFO", f"{name}: fitted peak {fitted.peak_flops / 1e12:.0f} TFLOP/s; no preset for this GPU")
    preset = DEVICE_PRESETS[preset_key]
    return Result("INFO", f"{name} vs preset {preset_key}: peak {fitted.peak_flops / 1e12:.0f} vs "
                          f"{preset.peak_flops / 1e12:.0f} TFLOP/s, memory bandwidth "
                          f"{fitted.hbm_bytes_per_s / 1e9:.0f} vs {preset.hbm_bytes_per_s / 1e9:.0f} GB/s")


def _median_seconds(fn: Callable[[], Any], repeats: int = 5) -> float:
    import torch

    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_offload() -> Result:
    import torch

    from merak.runtime.memory.offload import OffloadToHost

    layers = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(8)]).cuda()
    x = torch.randn(8192, 4096, device="cuda", requires_grad=True)

    def step(offload: bool) -> None:
        if offload:
            with OffloadToHost():
                y = layers(x)
        else:
            y = layers(x)
        y.sum().backward()

    base = _median_seconds(lambda: step(False))
    with_offload = _median_seconds(lambda: step(True))
    host = torch.empty(x.shape, pin_memory=True)
    copies = _median_seconds(lambda: [host.copy_(x.detach(), non_blocking=True) for _ in range(len(layers))])
    hidden = 1 - (with_offload - base) / copies if copies > 0 else 0.0
    return Result("INFO", f"step {base * 1e3:.1f} ms, with offload {with_offload * 1e3:.1f} ms, the copies alone "
                          f"{copies * 1e3:.1f} ms: {max(hidden, 0):.0%} of the copy time hidden under compute")


def check_pipeline() -> Result:
    import torch

    if torch.cuda.device_count() < 2:
        return Result("SKIP", "one GPU: NCCL refuses two ranks on the same device, and gloo sends no CUDA "
                              "tensors point to point; needs 2 GPUs")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "merak.launch.smoke", "--pp", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    ok = done.returncode == 0 and "OK" in done.stdout
    return Result("PASS" if ok else "FAIL", (done.stdout + done.stderr).strip().splitlines()[-1][:200])


def _measured_peak(plan: Any, mode: str, batches: list[dict[str, Any]]) -> tuple[int, Any]:
    """Peak allocated bytes of the second 1F1B step (AdamW states exist) at pp=1 in ``mode``."""
    import torch

    import merak
    from merak.partitioner import build_stage
    from merak.runtime.memory.policy import ActivationPlan
    from merak.runtime.pipeline.executor import PipelineExecutor
    from merak.runtime.pipeline.schedule import build

    activation_plan = ActivationPlan.from_mode(mode, plan)
    stage = build_stage(plan, 0, device="cuda")
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    executor = PipelineExecutor(stage, merak.get_grid(), optimizer, device="cuda", activation_plan=activation_plan)
    instructions = build("1f1b", 1, len(batches), 0, activation_plan.recompute_plan())
    executor.run(instructions, batches)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    executor.run(instructions, batches)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), activation_plan


def check_memory_estimator() -> Result:
    import gc

    import torch

    import merak
    from merak.partitioner import shard, trace
    from merak.runtime.memory.estimator import Layout, MemoryModel

    micro, m = 8, 4
    merak.init()
    try:
        batches = _token_dataset(micro * m)
        batches = [{k: torch.stack([b[k] for b in batches[i * micro:(i + 1) * micro]]) for k in batches[0]}
                   for i in range(m)]
        plan = shard(trace(_gpt2(), batches[0]), 1)
        memory = MemoryModel(plan, Layout(micro_batch_size=micro, num_microbatches=m, schedule="1f1b"))
        parts, worst = [], 0.0
        for mode in ("none", "full", "selective"):
            measured, activation_plan = _measured_peak(plan, mode, batches)
            estimated = memory.estimate(activation_plan)[0].total_bytes
            error = estimated / measured - 1
            worst = max(worst, abs(error))
            parts.append(f"{mode}: estimated {estimated / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB "
                         f"({error:+.0%})")
            gc.collect()
            torch.cuda.empty_cache()
        return Result("PASS" if worst <= 0.10 else "FAIL", "; ".join(parts) + " (limit 10%)")
    finally:
        merak.shutdown()


CHECKS: tuple[Check, ...] = (
    Check("trainer", f"MerakTrainer dp=tp=pp=1, GPT-2 4x256, fp32/bf16/fp16, {STEPS} steps: losses within 1% of fp32",
          check_trainer),
    Check("sdpa", "traced LLaMA stage, causal mask rewritten to is_causal: flash / memory-efficient SDPA kernel",
          check_sdpa),
    Check("device-rule", "real NCCL process group: the layer's device is the current CUDA device (an all-reduce "
          "there), CUDA waits untimed, p2p payload sends grouped with the receives",
          check_device_rule),
    Check("calibration", "calibrate_device('cuda', bfloat16) against the matching DEVICE_PRESETS entry",
          check_calibration),
    Check("offload", "8 x Linear(4096) forward+backward: offload on the side stream vs none vs copies alone",
          check_offload),
    Check("pipeline-2proc", "merak.launch.smoke at pp=2 over NCCL (needs 2 GPUs; skipped with the reason otherwise)",
          check_pipeline),
    Check("memory-estimator", "GPT-2 4x256 at pp=1, 1F1B, M=4: estimate vs torch.cuda.max_memory_allocated "
          "per recompute mode (none/full/selective) within 10%", check_memory_estimator),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the checks and the report path; run nothing")
    parser.add_argument("--only", nargs="*", default=None, help="names of the checks to run (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the markdown report to write")
    args = parser.parse_args(argv)
    chosen = [c for c in CHECKS if args.only is None or c.name in args.only]
    if args.dry_run:
        for check in chosen:
            print(f"would run {check.name}: {check.plan}")
        print(f"would write {args.out}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: nothing measured, no report written (use --dry-run to see the plan)",
              file=sys.stderr)
        return 2
    from common import markdown_table, write_markdown_report

    rows = []
    for check in chosen:
        start = time.perf_counter()
        try:
            result = check.run()
        except Exception as exc:  # noqa: BLE001 - one broken path must not hide the others
            result = Result("FAIL", f"{type(exc).__name__}: {str(exc)[:300]}")
        rows.append((check.name, result.status, f"{time.perf_counter() - start:.0f}", result.detail))
        print(f"{check.name}: {result.status} - {result.detail}", flush=True)
    body = f"Device: {torch.cuda.get_device_name()}\n\n" + markdown_table(("check", "status", "seconds", "figures"), rows)
    write_markdown_report(args.out, "GPU check (one device)", body, packages=("torch", "transformers"))
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
