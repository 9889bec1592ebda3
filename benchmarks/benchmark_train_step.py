"""One PCRLv2 training step: this engine vs the plain eager fp32 step, side by side in one run.

Both providers run the same official step on the same views (2 global 64x64x32 views, a target and six
16^3 local views per sample): three forward passes (x1, x2, all local views batched), the objective,
backward and an SGD step.
- ``eager_fp32``: the reference network and objective (pcrlv2_fast.reference), fp32, contiguous.
- ``engine``: NonSkipUNet3D + PCRLv2Loss through ``pretrain_step`` (the trainer's own step function, skip rules
  included) with the engine's settings (bf16 autocast, channels_last_3d).
- ``engine_compile`` (``--compile``): the same with the model under ``torch.compile``; its warm-up is a cold
  compilation (a fresh inductor cache directory).

Each row records its own provider's model, precision, layout and compile flag.

Usage: python benchmarks/benchmark_train_step.py --device cpu [--batch-size 2 --width 32 --steps 3 --compile]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import environment, median, time_call, write_rows  # noqa: E402

from pcrlv2_fast.losses import PCRLv2Loss  # noqa: E402
from pcrlv2_fast.models import NonSkipUNet3D  # noqa: E402
from pcrlv2_fast.profiler.flops import model_flops, step_passes  # noqa: E402
from pcrlv2_fast.reference import ReferencePCRLv23d, reference_step_loss  # noqa: E402
from pcrlv2_fast.train import PretrainConfig  # noqa: E402
from pcrlv2_fast.train.optim import build_optimizer  # noqa: E402
from pcrlv2_fast.train.step import StepEngine, pretrain_step  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_views(b: int, device: torch.device, gen: torch.Generator):
    x1 = torch.randn(b, 1, 64, 64, 32, generator=gen).to(device)
    x2 = torch.randn(b, 1, 64, 64, 32, generator=gen).to(device)
    gt = torch.rand(b, 1, 64, 64, 32, generator=gen).to(device)
    local_views = [torch.randn(b, 1, 16, 16, 16, generator=gen).to(device) for _ in range(6)]
    return x1, x2, gt, local_views


def flops_per_sample(width: int) -> float:
    """Forward+backward FLOPs of one sample (2 global + 6 local views): the profiler's count."""
    with torch.device("meta"):  # the architecture only
        model = NonSkipUNet3D(width=width)
    return model_flops(model, step_passes(2, (64, 64, 32), (16, 16, 16), 6)) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per provider (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="also time the engine under torch.compile")
    p.add_argument("--baseline-precision", default="fp32",
                   help="eager reference step precision(s), comma-separated (fp32, bf16, fp16; e.g. fp32,bf16: the "
                        "GPU targets compare against eager AMP); speed-ups are against the first")
    p.add_argument("--triton", action="store_true", help="also time the engine with the fused Triton kernels")
    p.add_argument("--peak-tflops", type=float, help="device peak for the model FLOP utilisation column")
    p.add_argument("--out", help="result JSON path (default benchmarks/results/train_step-<device>-<date>.json)")
    args = p.parse_args()
    if args.compile:
        # A fresh inductor cache: the recorded warm-up is a cold compilation, as a user's first run sees it.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pcrlv2_inductor_")

    device = torch.device(args.device)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x1, x2, gt, local_views = make_views(args.batch_size, device, gen)
    loc = torch.cat(local_views)
    fmt = torch.channels_last_3d if args.channels_last else torch.contiguous_format

    ref = ReferencePCRLv23d(base=args.width).to(device)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    amp = PRECISIONS[args.precision]
    loss_fn = PCRLv2Loss(total_epochs=240)
    ex1, ex2, egt, eloc = (t.contiguous(memory_format=fmt) for t in (x1, x2, gt, loc))
    def make_eager(precision: str):
        base_amp = PRECISIONS[precision]

        def eager_step():
            ctx = torch.autocast(device.type, dtype=base_amp) if base_amp is not None else nullcontext()
            with ctx:
                loss = reference_step_loss(ref, x1, x2, gt, local_views, 0, 240, random.Random(0))[0]
            ref_opt.zero_grad(set_to_none=True)
            loss.backward()
            ref_opt.step()

        return eager_step

    def make_engine(compile_model: bool, kernels: str = "torch"):
        model = NonSkipUNet3D(width=args.width, kernels=kernels, upsample_masks=kernels == "torch").to(device)
        model.load_state_dict(ref.state_dict())
        model = model.to(memory_format=fmt)
        forward = torch.compile(model) if compile_model else model
        # The trainer's optimizer (SGD 1e-3, momentum 0.9, weight decay 1e-4; fused on CUDA, primed momentum).
        opt = build_optimizer(PretrainConfig(lr=1e-3), model)
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        objective = loss_fn if kernels == "torch" else PCRLv2Loss(total_epochs=240, kernels=kernels)
        engine = StepEngine.build(model, objective, opt, scaler, amp, forward)
        return lambda: pretrain_step(engine, [(ex1, ex2, egt, eloc)], 0, random.Random(0))

    baselines = args.baseline_precision.split(",")
    for precision in baselines:
        if precision not in PRECISIONS:
            p.error(f"--baseline-precision: {precision!r} is not one of {list(PRECISIONS)}")
    base_name = "eager_" + baselines[0]
    # Each row carries its own provider's settings: the reference runs contiguous, uncompiled, in its precision.
    providers, settings = {}, {}
    for precision in baselines:
        providers["eager_" + precision] = make_eager(precision)
        settings["eager_" + precision] = {"model": "reference", "precision": precision, "channels_last": False,
                                          "compile": False, "kernels": "torch"}
    engine_settings = {"model": "NonSkipUNet3D", "precision": args.precision, "channels_last": args.channels_last}
    variants = [("engine", False, "torch")] + ([("engine_compile", True, "torch")] if args.compile else []) + (
        [("engine_triton", False, "triton")] if args.triton else [])
    for name, compiled, kernels in variants:
        providers[name] = make_engine(compiled, kernels)
        settings[name] = {**engine_settings, "compile": compiled, "kernels": kernels}
    times = {name: [] for name in providers}
    warm = {name: 0.0 for name in providers}
    peak = {}
    for name, fn in providers.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup):
            warm[name] += time_call(fn, device)
            print(f"{name}: warm-up {i + 1}/{args.warmup} done after {warm[name]:.2f} s", flush=True)
        if device.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    for i in range(args.steps):  # interleaved so that drift in machine load hits every provider alike
        for name, fn in providers.items():
            times[name].append(time_call(fn, device))
            print(f"{name}: step {i + 1}/{args.steps} {times[name][-1]:.3f} s", flush=True)

    flops = flops_per_sample(args.width)
    env = environment(device)
    base = median(times[base_name])
    shared = {"batch_size": args.batch_size, "width": args.width, "steps": args.steps, "warmup_steps": args.warmup}
    rows = []
    for name, ts in times.items():
        s = median(ts)
        row = {"benchmark": "train_step", "provider": name, **env, **shared, **settings[name],
               "warmup_s": warm[name], "s_per_step": s,
               "samples_per_s": args.batch_size / s, "speedup_vs_" + base_name: base / s,
               "tflops": flops * args.batch_size / s / 1e12, "gflop_per_sample": flops / 1e9}
        if args.peak_tflops:
            row["mfu"] = row["tflops"] / args.peak_tflops
            # Roofline floor of the step: its FLOPs at the device's dense peak.
            row["predicted_s_per_step"] = flops * args.batch_size / (args.peak_tflops * 1e12)
        if name in peak:
            row["peak_mem_gb"] = peak[name]
        rows.append(row)
    path = write_rows(rows, "train_step", device, args.out)
    print(f"\n{'provider':<15} {'s/step':>8} {'samples/s':>10} {'TFLOP/s':>8} {'speed-up':>9}")
    for r in rows:
        print(f"{r['provider']:<15} {r['s_per_step']:>8.3f} {r['samples_per_s']:>10.3f} {r['tflops']:>8.3f} "
              f"{r['speedup_vs_' + base_name]:>8.2f}x")
    print(f"device: {env['device']}, torch {env['torch']}; rows written to {path}")


if __name__ == "__main__":
    main()
