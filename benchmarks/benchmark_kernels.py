"""The fused Triton kernels on the GPU: per op against PyTorch, then the whole train step with kernels="triton".

Per op, providers ``fused`` (pcrlv2_fast.kernels), ``torch`` (the plain-PyTorch reference the kernels are tested
against) and ``torch_compile`` (that reference under torch.compile), modes ``fwd``, ``bwd`` and ``full`` (fwd +
bwd), timed with ``triton.testing.do_bench`` (median and 20/80% quantiles, ms). GB/s is the traffic the op must
move at the least (each input read once, each output written once) divided by the median time, so it is
comparable with the device's peak HBM bandwidth (the 80% target of the design):
- ``bn_act3d`` / ``gn_act3d`` (training BatchNorm / GroupNorm(8) + ReLU on the model's conv-block activations of
  64x64x32 views, one shape per encoder level): fwd reads x and writes y, bwd reads x and dy and writes dx;
- ``restoration_loss`` (full-resolution MSE and the three deep-supervision MSEs, masks at 1/4, 1/2, 1/1): fwd
  reads the restoration, target and masks; bwd also writes the gradients of the restoration and masks;
- ``cosine_pair_loss`` (one step's global and 12 local pairs at the official widths, pcrlv2_cosine_losses vs
  PCRLv2Loss's torch terms): fwd reads predictions and projections, bwd also writes the predictions' gradients.
  Kilobytes: launch-bound, its GB/s is not a bandwidth figure.

The train step (``pretrain_step``: 2 global views, 6 local views per sample, SGD) runs NonSkipUNet3D +
PCRLv2Loss with kernels="torch" (upsampled masks) and kernels="triton" (low-resolution masks), optionally both
under torch.compile, on the same weights and views: s/step, samples/s, TFLOP/s, peak memory, speed-up.

GPU only: with another device it says so and exits 0.

Usage: python benchmarks/benchmark_kernels.py --device cuda [--batch-size 8 --dtype bf16 --width 32 --ops all
                                                [--steps 10 --warmup 3 --compile --no-train-step --out rows.json]]
Rows: benchmarks/results/kernels-cuda-<date>.json (or --out).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import environment, median, roofline_ms, time_call, write_rows  # noqa: E402

OPS = ("bn_act3d", "gn_act3d", "restoration_loss", "cosine_pair_loss")
PROVIDERS = ("fused", "torch", "torch_compile")
MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VIEW = (64, 64, 32)  # a global view
N_LOCAL = 6


@dataclass
class Case:
    """One op on one shape: ``make(provider)`` returns (forward closure -> output, the inputs to differentiate).

    ``fwd_bytes`` / ``bwd_bytes``: the least traffic of the forward and of the backward."""

    op: str
    shape: str
    make: object
    fwd_bytes: int
    bwd_bytes: int
    extra: dict = field(default_factory=dict)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------------------- cases
def norm_act_cases(op: str, batch: int, width: int, dtype: torch.dtype, device: torch.device,
                   view=VIEW) -> list[Case]:
    """The conv-block activations of the encoder levels: (B, 2w * 2**k, X / 2**k, Y / 2**k, Z / 2**k)."""
    from pcrlv2_fast.kernels import norm_act

    from pcrlv2_fast.reference import norm_act as ref

    cases = []
    for level in range(4):
        c, f = 2 * width * 2**level, 2**level
        shape = (batch, c, *(s // f for s in view))
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        w = torch.rand(c, device=device) + 0.5
        b = torch.randn(c, device=device) * 0.1
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        groups = math.gcd(8, c)  # the model's GroupNorm: 8 groups at every official width

        def make(provider, x=x, w=w, b=b, rm=rm, rv=rv, groups=groups):
            impl = norm_act if provider == "fused" else ref
            if op == "bn_act3d":
                def fn(x, w, b):
                    return impl.bn_act3d(x, w, b, rm, rv, True, 0.1, 1e-5, "relu")
            elif provider == "fused":
                def fn(x, w, b):
                    return impl.gn_act3d(x, groups, w, b, 1e-5, "relu")
            else:
                # F.group_norm wants the affine parameters in the input's dtype on every device.
                def fn(x, w, b):
                    return impl.gn_act3d(x, groups, w.to(x.dtype), b.to(x.dtype), 1e-5, "relu")
            if provider == "torch_compile":
                fn = torch.compile(fn)
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
            return (lambda: fn(*leaves)), leaves

        cases.append(Case(op, "x".join(map(str, shape)), make, fwd_bytes=2 * _nbytes(x), bwd_bytes=3 * _nbytes(x),
                          extra={"layout": "channels_last_3d"}))
    return cases


def restoration_cases(batch: int, dtype: torch.dtype, device: torch.device, view=VIEW) -> list[Case]:
    from pcrlv2_fast.kernels import restoration_loss as rl

    from pcrlv2_fast.reference import fused_losses as ref

    target = torch.rand(batch, 1, *view, device=device)
    restored = torch.rand(batch, 1, *view, device=device, dtype=dtype)
    masks = [torch.rand(batch, 1, *(s // f for s in view), device=device, dtype=dtype) for f in (4, 2, 1)]
    weights = (0.5, 0.5, 0.5)

    def make(provider):
        fn = rl.restoration_loss if provider == "fused" else ref.restoration_loss_reference
        if provider == "torch_compile":
            fn = torch.compile(fn)
        leaves = [t.detach().clone().requires_grad_() for t in (restored, *masks)]
        return (lambda: fn(leaves[0], leaves[1:], target, weights)), leaves

    reads = _nbytes(restored, target, *masks)
    return [Case("restoration_loss", f"{batch}x1x{'x'.join(map(str, view))}+3 masks", make, fwd_bytes=reads,
                 bwd_bytes=reads + _nbytes(restored, *masks))]


def cosine_cases(batch: int, width: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    from pcrlv2_fast.kernels.cosine_loss import pcrlv2_cosine_losses

    from pcrlv2_fast.losses import pair_loss, split_views

    widths = (8 * width, 4 * width, 2 * width)

    def feats(rows):
        return [[torch.randn(rows, c, device=device, dtype=dtype) for _ in range(2)] for c in widths]

    f1, f2, fl = feats(batch), feats(batch), feats(N_LOCAL * batch)
    draws = random.Random(0)
    g_scale = draws.randint(0, 2)
    l_scales = [draws.randint(0, 2) for _ in range(2 * N_LOCAL)]

    def torch_terms(f1, f2, fl):
        views = split_views(fl, N_LOCAL)
        local = torch.stack([pair_loss(a, v, l_scales[2 * j + i]) for j, v in enumerate(views)
                             for i, a in enumerate((f1, f2))]).mean()
        return torch.stack([pair_loss(f1, f2, g_scale), local])

    def fused_terms(f1, f2, fl):
        return torch.stack(pcrlv2_cosine_losses(f1, f2, fl, N_LOCAL, g_scale, l_scales))

    def make(provider):
        fn = fused_terms if provider == "fused" else torch_terms
        if provider == "torch_compile":
            fn = torch.compile(fn)
        copies = [[[t.detach().clone().requires_grad_() for t in pair] for pair in f] for f in (f1, f2, fl)]
        preds = [pair[1] for f in copies for pair in f]
        return (lambda: fn(*copies)), preds

    tensors = [t for f in (f1, f2, fl) for pair in f for t in pair]
    preds = [pair[1] for f in (f1, f2, fl) for pair in f]
    return [Case("cosine_pair_loss", f"B={batch}, {N_LOCAL} local, C={widths}", make, fwd_bytes=_nbytes(*tensors),
                 bwd_bytes=_nbytes(*tensors) + _nbytes(*preds))]


# ---------------------------------------------------------------------------------------------- timing
def do_bench_ms(fn, grad_to_none) -> tuple[float, float, float]:
    """(median, p20, p80) in ms by triton.testing.do_bench (L2 flushed between runs)."""
    import triton.testing

    q = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    return tuple(float(v) for v in q)


def bench_case(case: Case, provider: str, mode: str, timer=do_bench_ms) -> dict:
    forward, leaves = case.make(provider)
    if mode == "fwd":
        fn = forward
    else:
        out = forward()
        dy = torch.randn_like(out)
        if mode == "bwd":
            def fn():
                torch.autograd.grad(out, leaves, dy, retain_graph=True, allow_unused=True)
        else:
            def fn():
                torch.autograd.grad(forward(), leaves, dy, allow_unused=True)
    ms, p20, p80 = timer(fn, leaves)
    moved = {"fwd": case.fwd_bytes, "bwd": case.bwd_bytes, "full": case.fwd_bytes + case.bwd_bytes}[mode]
    return {"benchmark": "kernels", "op": case.op, "shape": case.shape, "provider": provider, "mode": mode,
            "ms": ms, "ms_p20": p20, "ms_p80": p80, "bytes": moved, "gbps": moved / (ms * 1e-3) / 1e9,
            "predicted_ms_h100": roofline_ms(nbytes=moved), **case.extra}


def build_cases(ops, batch: int, width: int, dtype: torch.dtype, device: torch.device, view=VIEW) -> list[Case]:
    cases = []
    for op in ops:
        if op in ("bn_act3d", "gn_act3d"):
            cases += norm_act_cases(op, batch, width, dtype, device, view)
        elif op == "restoration_loss":
            cases += restoration_cases(batch, dtype, device, view)
        else:
            cases += cosine_cases(batch, width, dtype, device)
    return cases


# ------------------------------------------------------------------------------------------ train step
def train_step_rows(args, device: torch.device, timer=time_call) -> list[dict]:
    """s/step of pretrain_step with kernels="torch" and "triton" (and compiled), same weights and views."""
    from benchmark_train_step import flops_per_sample, make_views

    from pcrlv2_fast.losses import PCRLv2Loss
    from pcrlv2_fast.models import NonSkipUNet3D
    from pcrlv2_fast.train import PretrainConfig
    from pcrlv2_fast.train.optim import build_optimizer
    from pcrlv2_fast.train.step import StepEngine, pretrain_step

    gen = torch.Generator().manual_seed(0)
    x1, x2, gt, local_views = make_views(args.batch_size, device, gen)
    fmt = torch.channels_last_3d
    x1, x2, gt, loc = (t.contiguous(memory_format=fmt) for t in (x1, x2, gt, torch.cat(local_views)))
    amp = None if args.dtype == "fp32" else DTYPES[args.dtype]
    torch.manual_seed(0)
    weights = NonSkipUNet3D(width=args.width).state_dict()

    def make(kernels: str, compiled: bool):
        model = NonSkipUNet3D(width=args.width, kernels=kernels, upsample_masks=kernels == "torch").to(device)
        model.load_state_dict(weights)
        model = model.to(memory_format=fmt)
        forward = torch.compile(model) if compiled else model
        loss_fn = PCRLv2Loss(total_epochs=240, kernels=kernels)
        # The trainer's optimizer (SGD 1e-3, momentum 0.9, weight decay 1e-4; fused on CUDA, primed momentum).
        opt = build_optimizer(PretrainConfig(lr=1e-3), model)
        scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
        engine = StepEngine.build(model, loss_fn, opt, scaler, amp, forward)
        return lambda: pretrain_step(engine, [(x1, x2, gt, loc)], 0, random.Random(0))

    providers = {"engine_torch": make("torch", False), "engine_triton": make("triton", False)}
    if args.compile:
        providers.update(engine_torch_compile=make("torch", True), engine_triton_compile=make("triton", True))
    warm, times, peak = {}, {name: [] for name in providers}, {}
    for name, fn in providers.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm[name] = sum(timer(fn, device) for _ in range(args.warmup))
        print(f"{name}: warm-up done after {warm[name]:.2f} s", flush=True)
    for _ in range(args.steps):  # interleaved: drift in clocks or load hits every provider alike
        for name, fn in providers.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(timer(fn, device))
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))
    flops = flops_per_sample(args.width)
    base = median(times["engine_torch"])
    rows = []
    for name, ts in times.items():
        s = median(ts)
        rows.append({"benchmark": "train_step_kernels", "provider": name, "batch_size": args.batch_size,
                     "width": args.width, "precision": args.dtype, "channels_last": True,
                     "compile": name.endswith("compile"), "steps": args.steps, "warmup_s": warm[name],
                     "s_per_step": s, "samples_per_s": args.batch_size / s, "speedup_vs_engine_torch": base / s,
                     "tflops": flops * args.batch_size / s / 1e12, "peak_mem_gib": peak.get(name, 0) / 2**30})
    return rows


# ------------------------------------------------------------------------------------------------- main
def print_op_table(rows: list[dict]) -> None:
    print(f"\n{'op':<17} {'shape':<28} {'mode':<5} " + " ".join(f"{p + ' ms':>17} {'GB/s':>7}" for p in PROVIDERS))
    keyed = {(r["op"], r["shape"], r["mode"], r["provider"]): r for r in rows}
    for op, shape, mode in dict.fromkeys((r["op"], r["shape"], r["mode"]) for r in rows):
        cells = []
        for p in PROVIDERS:
            r = keyed.get((op, shape, mode, p))
            cells.append(f"{r['ms']:>17.4f} {r['gbps']:>7.0f}" if r else f"{'-':>17} {'-':>7}")
        print(f"{op:<17} {shape[:28]:<28} {mode:<5} " + " ".join(cells))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (other devices: a message and exit 0)")
    p.add_argument("--batch-size", type=int, default=8, help="samples (each: 2 global + 6 local views)")
    p.add_argument("--width", type=int, default=32, help="base channel count (32 = official)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="activation dtype / train-step autocast")
    p.add_argument("--ops", default="all", help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--steps", type=int, default=10, help="timed train steps per provider")
    p.add_argument("--warmup", type=int, default=3, help="untimed train steps per provider (compile, autotune)")
    p.add_argument("--compile", action="store_true", help="also time the train step under torch.compile")
    p.add_argument("--no-train-step", dest="train_step", action="store_false", help="only the per-op rows")
    p.add_argument("--out", help="result JSON (default benchmarks/results/kernels-cuda-<date>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print(f"benchmark_kernels: needs a CUDA device (got --device {args.device}, "
              f"CUDA available: {torch.cuda.is_available()}); nothing to do")
        return 0
    ops = OPS if args.ops == "all" else tuple(args.ops.split(","))
    unknown = set(ops) - set(OPS)
    if unknown:
        p.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    if device.index is not None:
        torch.cuda.set_device(device)
    env = environment(device)
    dtype = DTYPES[args.dtype]
    rows = []
    for case in build_cases(ops, args.batch_size, args.width, dtype, device):
        for provider in PROVIDERS:
            for mode in MODES:
                row = bench_case(case, provider, mode)
                rows.append({**env, "dtype": args.dtype, **row})
                print(f"{case.op} {case.shape} {provider} {mode}: {row['ms']:.4f} ms, {row['gbps']:.0f} GB/s",
                      flush=True)
    print_op_table(rows)
    if args.train_step:
        steps = train_step_rows(args, device)
        rows += [{**env, **r} for r in steps]
        print(f"\n{'provider':<24} {'s/step':>8} {'samples/s':>10} {'TFLOP/s':>8} {'peak GiB':>9} {'speed-up':>9}")
        for r in steps:
            print(f"{r['provider']:<24} {r['s_per_step']:>8.4f} {r['samples_per_s']:>10.2f} {r['tflops']:>8.2f} "
                  f"{r['peak_mem_gib']:>9.2f} {r['speedup_vs_engine_torch']:>8.2f}x")
    path = write_rows(rows, "kernels", device, args.out)
    print(f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}; rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
