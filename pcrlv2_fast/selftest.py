"""``pcrlv2-fast selftest``: every fused kernel against its plain-PyTorch reference, on small shapes.

For each op (bn_act3d, gn_act3d, restoration_loss, cosine_pair_loss and, when installed, conv3d_bn_stats) and
each dtype (float32, bfloat16, float16), the forward outputs and the gradients of every differentiable input
are compared with the reference run in float32 on the same (dtype-rounded) values. Errors are relative to the
reference's largest magnitude. float32 must agree to ``FP32_TOL``; bfloat16/float16 follow the project's rule
err(fused) <= 2 * err(eager PyTorch in the same dtype) + one unit in the last place of the dtype.

On a machine without CUDA the kernels run under the Triton interpreter, which must be chosen before triton is
imported: ``run_selftest`` sets ``TRITON_INTERPRET=1`` itself when triton is not loaded yet, and runs the checks
in a fresh process when triton was already imported for the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from .utils.tf32 import tf32_policy

KERNEL_MODULES = ("pcrlv2_fast.kernels.norm_act", "pcrlv2_fast.kernels.restoration_loss",
                  "pcrlv2_fast.kernels.cosine_loss", "pcrlv2_fast.kernels.conv3d_block")
DTYPES = ("float32", "bfloat16", "float16")
# float32: relative error bound (sums over a few hundred elements in a different order than torch's).
FP32_TOL = 1e-4
# float32 with TF32 allowed (--tf32): the kernels' fp32 dots and cuDNN's fp32 convolutions round their inputs to
# TF32's 10-bit mantissa (2^-11 relative per product).
TF32_TOL = 5e-3
# bfloat16/float16: one unit in the last place (relative), added to twice the eager error.
ULP = {"bfloat16": 2.0**-7, "float16": 2.0**-10}
COLUMNS = ("op", "dtype", "fwd max err", "bwd max err", "tolerance", "pass")


# --------------------------------------------------------------------------------------------- measuring
def _rel_err(actual, expected) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def _run(fn, inputs, round_dtype, compute_dtype, upstream):
    """fn on fresh leaves of ``inputs`` ((tensor, cast, needs_grad) triples: cast tensors are rounded to
    round_dtype and computed in compute_dtype, the others stay as given); returns (forward outputs, grads)."""
    leaves = []
    for t, cast, grad in inputs:
        v = t.to(round_dtype).to(compute_dtype) if cast else t
        leaves.append(v.detach().clone().requires_grad_(grad))
    outs, y = fn(*leaves)
    grads = torch.autograd.grad(y, [v for v, (_, _, g) in zip(leaves, inputs) if g], upstream(y))
    return [o.detach() for o in outs], grads


def _measure(op, dtype_name, fused, reference, inputs, device) -> dict:
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(7)
    cache = {}

    def upstream(y):
        # One upstream gradient per output shape, rounded to the dtype so every run sees the same values.
        if y.shape not in cache:
            cache[y.shape] = torch.randn(y.shape, generator=gen).to(dtype).float().to(device)
        return cache[y.shape].to(y.dtype)

    f_out, f_grads = _run(fused, inputs, dtype, dtype, upstream)
    r_out, r_grads = _run(reference, inputs, dtype, torch.float32, upstream)
    fwd = max(_rel_err(a, b) for a, b in zip(f_out, r_out, strict=True))
    bwd = max(_rel_err(a, b) for a, b in zip(f_grads, r_grads, strict=True))
    if dtype == torch.float32:
        tol = FP32_TOL
    else:
        e_out, e_grads = _run(reference, inputs, dtype, dtype, upstream)
        eager = max([_rel_err(a, b) for a, b in zip(e_out, r_out, strict=True)]
                    + [_rel_err(a, b) for a, b in zip(e_grads, r_grads, strict=True)])
        tol = 2 * eager + ULP[dtype_name]
    return {"op": op, "dtype": dtype_name, "fwd_err": fwd, "bwd_err": bwd, "tol": tol,
            "ok": fwd <= tol and bwd <= tol, "note": ""}


# ------------------------------------------------------------------------------------------------ checks
def _randn(*shape, gen, device, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(device)


def _check_bn_act3d(dtype_name, device):
    from .kernels import norm_act
    from .reference import norm_act as ref

    g = torch.Generator().manual_seed(0)
    C = 5
    x = _randn(2, C, 3, 5, 7, gen=g, device=device, scale=2.0, shift=0.5)
    w, b = _randn(C, gen=g, device=device, scale=0.2, shift=1.0), _randn(C, gen=g, device=device, scale=0.5)
    rm0, rv0 = _randn(C, gen=g, device=device, scale=0.1), torch.rand(C, generator=g).to(device) + 0.5

    def call(impl):
        def fn(x, w, b):
            rm, rv = rm0.clone(), rv0.clone()
            y = impl.bn_act3d(x, w, b, rm, rv, True, 0.1, 1e-5, "relu")
            return [y, rm, rv], y
        return fn

    inputs = [(x, True, True), (w, False, True), (b, False, True)]
    return _measure("bn_act3d", dtype_name, call(norm_act), call(ref), inputs, device)


def _check_gn_act3d(dtype_name, device):
    from .kernels import norm_act
    from .reference import norm_act as ref

    g = torch.Generator().manual_seed(1)
    C = 6
    x = _randn(2, C, 3, 5, 7, gen=g, device=device, scale=2.0, shift=0.5)
    w, b = _randn(C, gen=g, device=device, scale=0.2, shift=1.0), _randn(C, gen=g, device=device, scale=0.5)
    a = torch.rand(C, generator=g).to(device) * 0.5

    def call(impl):
        def fn(x, w, b, a):
            y = impl.gn_act3d(x, 3, w, b, 1e-5, "prelu", a)
            return [y], y
        return fn

    inputs = [(x, True, True), (w, False, True), (b, False, True), (a, False, True)]
    return _measure("gn_act3d", dtype_name, call(norm_act), call(ref), inputs, device)


def _check_restoration_loss(dtype_name, device):
    from .kernels import restoration_loss as rl
    from .reference import fused_losses as ref

    g = torch.Generator().manual_seed(2)
    full = (8, 12, 16)
    target = torch.rand(2, 1, *full, generator=g).to(device)
    restored = torch.rand(2, 1, *full, generator=g).to(device)
    masks = [torch.rand(2, 1, *(s // f for s in full), generator=g).to(device) for f in (4, 2, 1)]
    weights = (0.5, 0.3, 0.2)

    def call(impl):
        def fn(r, m0, m1, m2):
            terms = impl(r, [m0, m1, m2], target, weights)
            return [terms], terms
        return fn

    inputs = [(restored, True, True)] + [(m, True, True) for m in masks]
    return _measure("restoration_loss", dtype_name, call(rl.restoration_loss), call(ref.restoration_loss_reference),
                    inputs, device)


def _check_cosine_pair_loss(dtype_name, device):
    from .kernels import cosine_loss as cl
    from .reference import fused_losses as ref

    g = torch.Generator().manual_seed(3)
    preds = [_randn(4, 24, gen=g, device=device), _randn(8, 24, gen=g, device=device)]
    projs = [_randn(4, 24, gen=g, device=device), _randn(8, 24, gen=g, device=device)]
    # A global-like pair (slot 0) and a local-like pair on disjoint row ranges (slot 1).
    terms = cl.pair_terms(0, 0, 0, 1, 1, 4, 4, 1.0, 0) + cl.pair_terms(0, 0, 0, 1, 1, 0, 4, 0.5, 1)

    def call(impl):
        def fn(p0, p1, q0, q1):
            out = impl([p0, p1], [q0, q1], terms, 2)
            return [out], out
        return fn

    inputs = [(p, True, True) for p in preds] + [(q, True, False) for q in projs]
    return _measure("cosine_pair_loss", dtype_name, call(cl.cosine_pair_loss), call(ref.cosine_pair_loss_reference),
                    inputs, device)


def _check_conv3d_bn_stats(dtype_name, device, conv3d_bn_stats):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(4)
    x = _randn(2, 3, 4, 5, 6, gen=g, device=device)
    w = _randn(4, 3, 3, 3, 3, gen=g, device=device, scale=0.2)
    b = _randn(4, gen=g, device=device, scale=0.1)

    def fused(x, w, b):
        y, mean, var = conv3d_bn_stats(x, w, b, impl="triton")
        return [y, mean, var], y

    def reference(x, w, b):
        y = F.conv3d(x, w.to(x.dtype), b.to(x.dtype), padding=1)
        var, mean = torch.var_mean(y.float(), dim=(0, 2, 3, 4), correction=0)
        return [y, mean, var], y

    inputs = [(x, True, True), (w, False, True), (b, False, True)]
    return _measure("conv3d_bn_stats", dtype_name, fused, reference, inputs, device)


def _conv3d_bn_stats_fn():
    import importlib

    name = "pcrlv2_fast.kernels.conv3d_block"
    try:
        return importlib.import_module(name).conv3d_bn_stats
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


def _run_checks(device) -> list[dict]:
    checks = [("bn_act3d", _check_bn_act3d), ("gn_act3d", _check_gn_act3d),
              ("restoration_loss", _check_restoration_loss), ("cosine_pair_loss", _check_cosine_pair_loss)]
    conv = _conv3d_bn_stats_fn()
    if conv is not None:
        checks.append(("conv3d_bn_stats", lambda dt, dev: _check_conv3d_bn_stats(dt, dev, conv)))
    rows = []
    for op, check in checks:
        for dtype_name in DTYPES:
            try:
                rows.append(check(dtype_name, device))
            except Exception as exc:  # reported as a failed row: the table shows every op, not the first error
                rows.append({"op": op, "dtype": dtype_name, "fwd_err": None, "bwd_err": None, "tol": None,
                             "ok": False, "note": f"{type(exc).__name__}: {exc}"})
    if conv is None:
        rows.append({"op": "conv3d_bn_stats", "dtype": "-", "fwd_err": None, "bwd_err": None, "tol": None,
                     "ok": None, "note": "not installed (pcrlv2_fast.kernels.conv3d_block)"})
    return rows


# ----------------------------------------------------------------------------------------------- process
def _triton_compiled_for_gpu() -> bool:
    """True when Triton is already imported in compiled (not interpreter) mode: triton.jit decides when a function
    is decorated, which for Triton's own library functions is when triton is imported, so TRITON_INTERPRET can
    no longer take effect in this process."""
    if "triton" not in sys.modules:
        return False
    from triton.runtime.jit import JITFunction

    modules = [sys.modules.get(name) for name in ("triton.language.standard", *KERNEL_MODULES)]
    return any(isinstance(v, JITFunction) for mod in modules if mod is not None for v in vars(mod).values())


def _rows_from_subprocess(device: str, tf32: bool) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pcrlv2_fast.selftest", "--device", device, "--json"]
                          + (["--tf32"] if tf32 else []), capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"selftest subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def _apply_tf32_tolerance(rows: list[dict]) -> list[dict]:
    for r in rows:
        if r["dtype"] == "float32" and r["tol"] is not None:
            r["tol"] = TF32_TOL
            r["ok"] = r["fwd_err"] <= TF32_TOL and r["bwd_err"] <= TF32_TOL
            r["note"] = (r["note"] + " TF32").strip()
    return rows


def run_selftest(device: str | None = None, tf32: bool = False) -> list[dict]:
    """Check every kernel against its reference; one row per (op, dtype): op, dtype, fwd_err, bwd_err, tol,
    ok (None for an op that is not installed) and note. TF32 is off for the checks (fp32 compared in IEEE
    arithmetic, tolerance FP32_TOL) unless ``tf32``, which allows it and uses TF32_TOL for the fp32 rows."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        if _triton_compiled_for_gpu():
            return _rows_from_subprocess(str(dev), tf32)
        os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernel modules are imported
    elif dev.type != "cuda":
        raise ValueError(f"the selftest runs on cuda or on the cpu (Triton interpreter), not {dev.type}")
    with tf32_policy(tf32):
        rows = _run_checks(dev)
    return _apply_tf32_tolerance(rows) if tf32 else rows


# ------------------------------------------------------------------------------------------------ output
def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def format_table(rows: list[dict]) -> str:
    cells = [(r["op"], r["dtype"], _fmt(r["fwd_err"]), _fmt(r["bwd_err"]), _fmt(r["tol"]),
              {True: "yes", False: "NO", None: "skip"}[r["ok"]]) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(COLUMNS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r, c in zip(rows, cells):
        line = "  ".join(v.ljust(w) for v, w in zip(c, widths))
        lines.append(f"{line}  {r['note']}".rstrip())
    return "\n".join(lines)


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda, cuda:N or cpu (Triton interpreter); default: cuda when available")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line instead of the table")
    p.add_argument("--arch", help="instead of running the kernels: compile every configuration the engine launches "
                                   "for the official model for this GPU architecture (sm_90) and report registers, "
                                   "spills and shared memory (no GPU needed)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32,tf32", help="with --arch: the precisions to compile")
    p.add_argument("--json-out", metavar="PATH", help="with --arch: also write the report as JSON")
    p.add_argument("--tf32", action="store_true",
                   help=f"allow TF32 in fp32 matmuls/convolutions (fp32 tolerance {TF32_TOL:g}, not {FP32_TOL:g})")


def _report(args: argparse.Namespace) -> int:
    if args.arch:
        from .compile_report import run

        return run(args.arch, tuple(args.dtypes.split(",")), args.json_out)
    rows = run_selftest(args.device, args.tf32)
    if args.json:
        print(json.dumps(rows))
    else:
        where = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        mode = "" if where.startswith("cuda") else " (Triton interpreter)"
        policy = (f"TF32 on: fp32 rows within {TF32_TOL:g}" if args.tf32
                  else "TF32 off: fp32 compared in IEEE arithmetic")
        print(f"pcrlv2_fast kernel selftest on {where}{mode}; errors relative to the fp32 reference's largest value; "
              f"{policy}")
        print(format_table(rows))
        failed = [r for r in rows if r["ok"] is False]
        print(f"{len(failed)} of {sum(r['ok'] is not None for r in rows)} checks failed" if failed
              else "all checks passed")
    return 1 if any(r["ok"] is False for r in rows) else 0


def add_selftest_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``selftest`` on the CLI's subparsers (handler in ``func``, returning the exit status)."""
    p = subparsers.add_parser("selftest", help="check every fused kernel against its PyTorch reference")
    _add_args(p)
    p.set_defaults(func=_report)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pcrlv2-fast selftest", description=__doc__.split("\n\n")[0])
    _add_args(parser)
    return _report(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
