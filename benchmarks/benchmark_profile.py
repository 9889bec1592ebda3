"""The profiler's figures for the README: ``pcrlv2-fast profile`` of the engine's step (phases, FLOP
utilisation, the slowest layers) and a ``--compare`` matrix against the official-equivalent step, in one run.

Synthetic CT-sized volumes (no files), the official crop geometry, width 32 (the official network).

Usage: python benchmarks/benchmark_profile.py --device cpu [--batch-size 2 --steps 10 --warmup 2 --compare-steps 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import environment, write_rows  # noqa: E402

from pcrlv2_fast.profiler import ProfileConfig, parse_compare, profile  # noqa: E402
from pcrlv2_fast.train import PretrainConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compare-steps", type=int, default=3)
    p.add_argument("--out", help="result JSON path (default benchmarks/results/profile-<device>-<date>.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    env = environment(device)
    with tempfile.TemporaryDirectory() as tmp:
        engine = PretrainConfig(data="", out=f"{tmp}/profile", width=args.width, batch_size=args.batch_size,
                                precision="bf16", channels_last=True, device=args.device, tensorboard=False,
                                pictures=False)
        result = profile(ProfileConfig(engine, steps=args.steps, warmup=args.warmup, synthetic=True, layer_steps=2))
        matrix = parse_compare(["precision=fp32,bf16", "channels_last=0,1"])
        compare = profile(ProfileConfig(PretrainConfig(**{**engine.__dict__, "out": f"{tmp}/compare"}),
                                        steps=args.compare_steps, warmup=1, synthetic=True, compare=matrix))
    command = (f"python benchmarks/benchmark_profile.py --device {args.device} --width {args.width} --batch-size "
               f"{args.batch_size} --steps {args.steps} --warmup {args.warmup} --compare-steps {args.compare_steps}")
    keep = ("config", "device", "steps", "warmup", "batch_size", "width", "step", "phases", "phase_check",
            "throughput", "memory")
    rows = [{"kind": "profile", **env, "command": command, **{k: result[k] for k in keep},
             "layers": result["layers"][:8], "top_kernels": result["top_kernels"][:5]},
            {"kind": "compare", **env, "command": command, **compare["compare"]}]
    print(f"wrote {write_rows(rows, 'profile', device, args.out)}")


if __name__ == "__main__":
    main()
