"""conv3d_block: the fused 3x3x3 conv + bias + BatchNorm statistics vs cuDNN, on the PCRLv2 network's conv shapes.

Providers (``--providers``):
- ``triton``: ``conv3d_bn_stats(impl="triton")``: implicit-GEMM kernels, per-tile (count, mean, M2) in the
  forward's epilogue merged by a small Chan-formula kernel.
- ``torch``: ``conv3d_bn_stats(impl="torch")``: F.conv3d / aten.convolution_backward (cuDNN) and
  torch.var_mean for the mean and variance.
- ``torch_compile``: the plain-PyTorch reference (pcrlv2_fast/reference/conv3d_block.py) under torch.compile.
- ``auto``: ``conv3d_bn_stats(impl="auto")``, the per-shape measured choice (it prints its decisions).
Modes (``--modes``): ``fwd``; ``bwd`` (dx, dweight, dbias from a saved forward); ``full`` (fwd + bwd);
``block``: a whole LUConv step, conv -> BatchNorm3d (training) -> ReLU, forward and backward. There the
torch provider is eager cuDNN conv + F.batch_norm + ReLU, and triton / auto are conv3d_bn_stats followed by
the fused bn_act3d kernel (kernels/norm_act.py), which still gathers its own statistics. That is one pass
over y more than a BatchNorm applied from the returned mean/var would need.
TFLOP/s counts the convolution only: 2 * N*D*H*W * 27 * C_in * C_out per GEMM (forward 1, backward 2).

GPU only (``--device cuda``); on a CPU it prints why and exits 0.

Usage: python benchmarks/benchmark_conv3d_block.py --device cuda [--batch-size 8 --dtype bf16 --shapes model]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import environment, roofline_ms, write_rows  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (C_in, C_out, D, H, W) of every 3x3x3 conv of the official network (width 32) on a 64x64x32 global view:
# encoder, then decoder (after each transposed conv), then the 1-channel deep-supervision heads.
MODEL_SHAPES = [
    (1, 32, 64, 64, 32), (32, 64, 64, 64, 32), (64, 64, 32, 32, 16), (64, 128, 32, 32, 16),
    (128, 128, 16, 16, 8), (128, 256, 16, 16, 8), (256, 256, 8, 8, 4), (256, 512, 8, 8, 4),
    (512, 256, 16, 16, 8), (256, 256, 16, 16, 8), (256, 128, 32, 32, 16), (128, 128, 32, 32, 16),
    (128, 64, 64, 64, 32), (64, 64, 64, 64, 32), (256, 1, 16, 16, 8), (128, 1, 32, 32, 16), (64, 1, 64, 64, 32),
]
SMOKE_SHAPES = [(32, 64, 16, 16, 8), (64, 128, 8, 8, 4)]


def parse_shapes(spec: str) -> list[tuple[int, ...]]:
    if spec == "model":
        return MODEL_SHAPES
    if spec == "smoke":
        return SMOKE_SHAPES
    shapes = [tuple(int(v) for v in item.split(",")) for item in spec.split(";")]
    if any(len(s) != 5 for s in shapes):
        raise SystemExit("--shapes takes 'model', 'smoke' or 'C_in,C_out,D,H,W;C_in,C_out,D,H,W;...'")
    return shapes


def make_case(shape, batch: int, dtype: torch.dtype, device: torch.device):
    c_in, c_out, D, H, W = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, c_in, D, H, W, device=device, dtype=dtype, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(c_out, c_in, 3, 3, 3, device=device, generator=gen) / (27 * c_in) ** 0.5
    b = torch.randn(c_out, device=device, generator=gen) * 0.1
    dy = torch.randn(batch, c_out, D, H, W, device=device, dtype=dtype, generator=gen)
    return x, w.to(dtype), b.to(dtype), dy.contiguous(memory_format=torch.channels_last_3d)


def conv_fn(provider: str, compiled: dict):
    """fn(x, w, b) -> (y, mean, var) for a provider."""
    from pcrlv2_fast.kernels import conv3d_block

    from pcrlv2_fast.reference import conv3d_block as conv3d_reference

    if provider == "torch_compile":
        if "conv" not in compiled:
            compiled["conv"] = torch.compile(conv3d_reference.conv3d_bn_stats)
        return compiled["conv"]
    return lambda x, w, b: conv3d_block.conv3d_bn_stats(x, w, b, impl=provider)


def block_fn(provider: str, compiled: dict):
    """fn(x, w, b, bn_w, bn_b, running_mean, running_var) -> relu(batch_norm(conv(x))) for a provider."""
    from pcrlv2_fast.kernels import conv3d_block, norm_act

    def eager(x, w, b, bn_w, bn_b, rm, rv):
        y = F.conv3d(x, w, b, padding=1)
        return F.relu(F.batch_norm(y, rm, rv, bn_w, bn_b, True, 0.1, 1e-5))

    if provider == "torch":
        return eager
    if provider == "torch_compile":
        if "block" not in compiled:
            compiled["block"] = torch.compile(eager)
        return compiled["block"]

    def fused(x, w, b, bn_w, bn_b, rm, rv):
        y, _, _ = conv3d_block.conv3d_bn_stats(x, w, b, impl=provider)
        return norm_act.bn_act3d(y, bn_w, bn_b, rm, rv, True, 0.1, 1e-5, "relu")

    return fused


def bench(fn, quantiles=(0.5, 0.2, 0.8)) -> list[float]:
    import triton.testing

    return triton.testing.do_bench(fn, quantiles=list(quantiles), warmup=25, rep=100)


def run_case(shape, mode: str, provider: str, args, device, compiled: dict) -> dict:
    dtype = DTYPES[args.dtype]
    x, w, b, dy = make_case(shape, args.batch_size, dtype, device)
    params = [t.requires_grad_() for t in (x, w, b)]
    if mode == "block":
        c_out = shape[1]
        bn_w = torch.ones(c_out, device=device, requires_grad=True)
        bn_b = torch.zeros(c_out, device=device, requires_grad=True)
        rm, rv = torch.zeros(c_out, device=device), torch.ones(c_out, device=device)
        fn = block_fn(provider, compiled)

        def step():
            y = fn(x, w, b, bn_w, bn_b, rm, rv)
            torch.autograd.grad(y, [x, w, b, bn_w, bn_b], dy)

        timed = step
    else:
        fn = conv_fn(provider, compiled)
        if mode == "fwd":
            def timed():
                with torch.no_grad():
                    fn(x, w, b)
        else:
            # autograd.grad, not backward: no accumulation into .grad (an extra pass over dx) inside the timing.
            def forward_backward():
                torch.autograd.grad(fn(x, w, b)[0], params, dy)

            if mode == "full":
                timed = forward_backward
            else:
                y_saved = fn(x, w, b)[0]

                def timed():
                    torch.autograd.grad(y_saved, params, dy, retain_graph=True)
    ms, lo, hi = bench(timed)
    c_in, c_out, D, H, W = shape
    gemm_flop = 2.0 * args.batch_size * D * H * W * 27 * c_in * c_out
    flop = gemm_flop * {"fwd": 1, "bwd": 2, "full": 3, "block": 3}[mode]
    return {"benchmark": "conv3d_block", "provider": provider, "mode": mode, "batch_size": args.batch_size,
            "c_in": c_in, "c_out": c_out, "d": D, "h": H, "w": W, "dtype": args.dtype, "ms": ms, "ms_p20": lo,
            "ms_p80": hi, "tflops": flop / (ms * 1e-3) / 1e12,
            "predicted_ms_h100": roofline_ms(flop, nbytes=sum(t.numel() * t.element_size() for t in (x, w, dy)))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--shapes", default="model",
                   help="'model' (every conv of the official network), 'smoke', or 'C_in,C_out,D,H,W;...'")
    p.add_argument("--modes", default="fwd,bwd,full,block")
    p.add_argument("--providers", default="triton,torch,torch_compile")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 (torch's cuDNN default)")
    p.add_argument("--out", help="result JSON path (default benchmarks/results/conv3d_block-<device>-<date>.json)")
    args = p.parse_args()

    if args.device != "cuda" or not torch.cuda.is_available():
        print("benchmark_conv3d_block: GPU only (the Triton kernels run on CUDA; under the CPU interpreter a "
              "timing would say nothing). Run with --device cuda on a machine with a GPU.")
        return
    device = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True  # cuDNN at its best: it picks its own algorithm per shape too
    modes = args.modes.split(",")
    providers = args.providers.split(",")
    env = environment(device)
    rows, compiled = [], {}
    for shape in parse_shapes(args.shapes):
        compiled.clear()  # one compiled graph per shape (no recompilation across shapes inside a timing)
        for mode in modes:
            base = None
            for provider in providers:
                row = {**run_case(shape, mode, provider, args, device, compiled), **env}
                base = row["ms"] if provider == "torch" else base
                rows.append(row)
                print(f"{shape[0]:>4}->{shape[1]:<4} {shape[2]}x{shape[3]}x{shape[4]:<3} {mode:<5} {provider:<14} "
                      f"{row['ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s", flush=True)
            for row in rows[-len(providers):]:
                row["speedup_vs_torch"] = base / row["ms"] if base else None
    path = write_rows(rows, "conv3d_block", device, args.out)
    print(f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}; rows written to {path}")


if __name__ == "__main__":
    main()
