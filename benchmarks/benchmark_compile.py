"""The sm_90 compile report as benchmark rows: every Triton kernel configuration the engine launches for the
official model, compiled for Hopper here (no GPU), with registers, spills, shared memory and resident warps.

Usage: python benchmarks/benchmark_compile.py [--arch sm_90] [--dtypes bf16,fp16,fp32,tf32]
Rows go to benchmarks/results/compile-<arch>-<date>.json (README table: python benchmarks/report.py --write).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from pcrlv2_fast.kernels import interpreting

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import RESULTS, environment, write_rows  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--dtypes", default="bf16,fp16,fp32,tf32")
    p.add_argument("--out", help="result JSON path (default benchmarks/results/compile-<arch>-<date>.json)")
    args = p.parse_args()
    if interpreting():
        sys.exit("run without TRITON_INTERPRET=1: the launchers must pick their GPU configurations")
    from pcrlv2_fast import compile_report as cr

    rows = cr.report(args.arch, tuple(args.dtypes.split(",")))
    print(cr.format_table(rows, args.arch))
    env = environment(torch.device("cpu"))
    env["device"] = f"{args.arch} ({cr.ARCHS[args.arch]['gpu']}), compiled on {env['device']}"
    out = args.out or RESULTS / f"compile-{args.arch}-{datetime.date.today().isoformat()}.json"
    path = write_rows([{"benchmark": "compile", "arch": args.arch, **env, **asdict(r)} for r in rows], "compile",
                      torch.device("cpu"), out)
    print(f"rows written to {path}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
