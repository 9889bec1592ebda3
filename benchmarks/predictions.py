"""Roofline predictions for an H100 SXM, to judge the first GPU run by (nothing here is measured).

For the official model (width 32) at batch 32 per step (2 global 64x64x32 views and 6 local 16^3 views per
sample): every conv layer's forward, data-gradient and weight-gradient GEMM, the fused norm + activation passes
over each conv output, the restoration loss, and the whole step. Each row's floor is its FLOPs at 989 TFLOP/s
(dense bf16) or its bytes at 3.35 TB/s, whichever binds (``utils.roofline_ms``); bytes are the least traffic in
bf16 (each operand read once, each result written once). The measured figures of ``make gpu-check`` stand beside
these in its summary.

Usage: python benchmarks/predictions.py   (rows: benchmarks/results/predictions-h100-<date>.json)
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_train_step import flops_per_sample  # noqa: E402
from utils import H100, RESULTS, environment, roofline_ms, write_rows  # noqa: E402

from pcrlv2_fast.compile_report import official_conv_layers  # noqa: E402

BATCH, WIDTH, BF16 = 32, 32, 2


def conv_rows() -> list[dict]:
    """The conv GEMMs of one step: x1 and x2 (batch 32 each) and the local views (batch 192) per layer."""
    rows = []
    for (n, c_in, d, h, w), c_out in official_conv_layers(WIDTH, BATCH):
        voxels = n * d * h * w
        flop = 2.0 * voxels * 27 * c_in * c_out
        x, y, wt = voxels * c_in * BF16, voxels * c_out * BF16, 27 * c_in * c_out * BF16
        views = 2 if n == BATCH else 1  # the global layers run for x1 and for x2
        for pass_, nbytes in (("fwd", x + wt + y), ("dgrad", y + wt + x), ("wgrad", x + y + wt)):
            rows.append({"op": f"conv {c_in}->{c_out}", "shape": f"{n}x{d}x{h}x{w}", "pass": pass_, "count": views,
                         "flop": flop, "bytes": nbytes, "predicted_ms": roofline_ms(flop, nbytes)})
        # Fused BatchNorm + activation: forward reads y, writes the activation; backward reads both, writes dy.
        for pass_, nbytes in (("norm_act fwd", 2 * y), ("norm_act bwd", 3 * y)):
            rows.append({"op": f"bn_act {c_out}", "shape": f"{n}x{d}x{h}x{w}", "pass": pass_, "count": views,
                         "flop": 0.0, "bytes": nbytes, "predicted_ms": roofline_ms(0.0, nbytes)})
    return rows


def step_row() -> dict:
    flop = flops_per_sample(WIDTH) * BATCH
    ms = roofline_ms(flop)
    return {"op": "train step", "shape": f"batch {BATCH}", "pass": "fwd+bwd", "count": 1, "flop": flop, "bytes": 0.0,
            "predicted_ms": ms, "samples_per_s": BATCH / (ms / 1e3)}


def main() -> int:
    rows = conv_rows()
    restoration = BATCH * 64 * 64 * 32 * BF16
    rows.append({"op": "restoration_loss", "shape": f"{BATCH}x64x64x32", "pass": "fwd+bwd", "count": 1, "flop": 0.0,
                 "bytes": 5 * restoration, "predicted_ms": roofline_ms(0.0, 5 * restoration)})
    rows.append(step_row())
    env = environment(torch.device("cpu"))
    env["device"] = f"predicted for H100 SXM ({H100['bf16_tflops']:.0f} TFLOP/s bf16, {H100['hbm_gbps']:.0f} GB/s)"
    out = RESULTS / f"predictions-h100-{datetime.date.today().isoformat()}.json"
    path = write_rows([{"benchmark": "predictions", **env, **r} for r in rows], "predictions", torch.device("cpu"),
                      out)
    summed = sum(r["predicted_ms"] * r["count"] for r in rows if r["op"] != "train step")
    print(f"conv + norm + loss floors summed: {summed:.1f} ms per step; whole-step FLOP floor "
          f"{rows[-1]['predicted_ms']:.1f} ms ({rows[-1]['samples_per_s']:.0f} samples/s); rows in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
