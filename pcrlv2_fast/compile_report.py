"""Compile every Triton kernel configuration the engine launches for the official model, for a GPU that is not here.

Triton compiles for a target without a GPU (``triton.compile(ASTSource, target=GPUTarget("cuda", 90, 32))``) and
its wheel's ``cuobjdump -res-usage`` reads the cubin's registers, stack, local (spill) memory and shared memory.
Which configurations: the kernels' own launchers run on meta tensors that stand in for the official network's
CUDA tensors (width 32, batch 32, global views 64x64x32, six 16^3 local views per sample), with the target's
SM count, while ``JITFunction.run`` is replaced by a recorder. So the tile sizes, warps, stages and flags are the
ones the launchers choose on that GPU, not a hand-kept list. Each distinct (kernel, signature, constants,
warps, stages) is compiled once.

A row fails on a compile error, on spills (local memory) unless the kernel is listed in ``ALLOWED_SPILLS`` with
the reason, and on more shared memory than a block may use. ``pcrlv2-fast selftest --arch sm_90`` prints the
table; the launchers must run with the interpreter off, so from an interpreter process the report runs in a
child process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial

import torch

from .kernels import interpreting
from .utils.tf32 import tf32_policy

# Per architecture: SMs of the reference GPU, registers per SM, resident warps per SM, shared memory per block.
ARCHS = {"sm_90": {"capability": 90, "sms": 132, "regs": 65536, "warps": 64, "blocks": 32,
                   "shared_per_block": 232448, "shared_per_sm": 233472, "gpu": "H100 SXM"}}
# Kernels whose spills are accepted, with the reason (none so far).
ALLOWED_SPILLS: dict[str, str] = {}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
        torch.int32: "*i32", torch.uint8: "*u8", torch.bool: "*i1"}
REPRESENTATIVE = ("bf16",)  # the subset `make test` compiles: the engine's default precision


@dataclass
class Launch:
    kernel: str
    op: str  # which launcher asked for it
    signature: dict
    constants: dict
    num_warps: int
    num_stages: int

    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, self.constants, self.num_warps, self.num_stages],
                          sort_keys=True, default=str)


@dataclass
class Row:
    kernel: str
    op: str
    config: str
    regs: int | None = None
    spill_bytes: int | None = None
    stack: int | None = None
    shared: int | None = None
    warps_per_sm: int | None = None
    ok: bool = False
    note: str = ""


# ------------------------------------------------------------------------------------------------- recording
class _CudaMeta(torch.Tensor):
    """A meta tensor that reports itself as a CUDA tensor, so the launchers take their GPU branches."""

    @property
    def is_cuda(self) -> bool:
        return True


def _meta(shape, dtype, channels_last: bool = False) -> torch.Tensor:
    t = torch.empty(shape, device="meta", dtype=dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last_3d)
    return t.as_subclass(_CudaMeta)


def _arg_type(value) -> str | tuple:
    if isinstance(value, tuple):  # a tuple argument: a tuple of types
        return tuple(_arg_type(v) for v in value)
    if isinstance(value, torch.Tensor):
        return _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


@contextlib.contextmanager
def recording(sms: int) -> Iterator[list[Launch]]:
    """Replace kernel launches by records, the target's SM count and no-op device guards."""
    from triton.runtime.jit import JITFunction

    from .kernels import conv3d_block, cosine_loss, norm_act, restoration_loss

    launches: list[Launch] = []
    op = {"name": ""}

    def record(self, *args, grid=None, warmup=False, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        values = dict(zip(self.arg_names, args))
        values.update(kwargs)
        signature, constants = {}, {}
        for param in self.params:
            value = values[param.name]
            if param.is_constexpr or value is None:
                signature[param.name], constants[param.name] = "constexpr", value
            else:
                signature[param.name] = _arg_type(value)
        launches.append(Launch(self.__name__, op["name"], signature, constants, options.get("num_warps", 4),
                               options.get("num_stages", 3)))

    saved = JITFunction.run
    patches = [(m, "device_guard", lambda t: contextlib.nullcontext())
               for m in (conv3d_block, cosine_loss, norm_act, restoration_loss)]
    patches += [(conv3d_block, "num_sms", lambda t, cpu=4: sms), (norm_act, "num_sms", lambda t, cpu=1: sms),
                (torch.cuda, "current_device", lambda: 0)]
    originals = [(m, name, getattr(m, name)) for m, name, _ in patches]
    JITFunction.run = record
    for m, name, value in patches:
        setattr(m, name, value)
    try:
        yield launches, op
    finally:
        JITFunction.run = saved
        for m, name, value in originals:
            setattr(m, name, value)


# ------------------------------------------------------------------------------------------------ the launches
def official_conv_layers(width: int = 32, batch: int = 32, n_local: int = 6) -> list[tuple[tuple, int]]:
    """((N, C_in, D, H, W), C_out) of every conv block of the official network, for global and local views."""
    from .models import LUConv, NonSkipUNet3D

    layers = []
    with torch.device("meta"):
        model = NonSkipUNet3D(width=width)
        hooks = [m.register_forward_hook(lambda mod, inp, out: layers.append((tuple(inp[0].shape),
                                                                              mod.conv1.out_channels)))
                 for m in model.modules() if isinstance(m, LUConv)]
        model(torch.empty(batch, 1, 64, 64, 32))
        model(torch.empty(batch * n_local, 1, 16, 16, 16), local=True)
    for h in hooks:
        h.remove()
    return sorted(set(layers))


def _conv_launches(dtype_name: str, layers) -> Iterator[tuple[str, Callable[[], object]]]:
    from .kernels import conv3d_block as cb

    dtype = DTYPES[dtype_name]
    for shape, c_out in layers:
        c_in = shape[1]
        x, dy = _meta(shape, dtype, True), _meta((shape[0], c_out, *shape[2:]), dtype, True)
        w, b = _meta((c_out, c_in, 3, 3, 3), dtype), _meta((c_out,), dtype)
        yield "conv3d_block fwd", lambda x=x, w=w, b=b: cb.triton_forward(x, w, b)
        yield "conv3d_block bwd", lambda x=x, w=w, dy=dy: cb.triton_backward(dy, x, w, True, True, True)


def _norm_launches(dtype_name: str, layers) -> Iterator[tuple[str, Callable[[], object]]]:
    from .kernels import norm_act as na

    dtype = DTYPES[dtype_name]
    bn_fwd, bn_bwd = na._bn_fwd_op._init_fn, na._bn_bwd_op._init_fn
    gn_fwd, gn_bwd = na._gn_fwd_op._init_fn, na._gn_bwd_op._init_fn
    for shape in sorted({(shape[0], c_out, *shape[2:]) for shape, c_out in layers}):
        c = shape[1]
        act = "sigmoid" if c == 1 else "relu"
        y = _meta(shape, dtype, True)
        w, b, mean, rstd = (_meta((c,), torch.float32) for _ in range(4))
        # After a conv that produced the statistics: apply with given statistics; the batch-statistics backward.
        yield "bn_act3d apply", partial(bn_fwd, y, w, b, mean, rstd, None, False, 0.0, 1e-5, act)
        yield "bn_act3d bwd", partial(bn_bwd, y, y, w, b, None, mean, rstd, True, act, True)
        # Without the conv statistics (another norm source): the statistics passes too.
        yield "bn_act3d train", partial(bn_fwd, y, w, b, _meta((c,), torch.float32), _meta((c,), torch.float32),
                                        None, True, 0.1, 1e-5, act)
        if c % 8 == 0:  # --norm gn (8 groups) and --norm in
            for groups, label in ((8, "gn_act3d"), (c, "in (gn_act3d)")):
                stat = _meta((shape[0] * groups,), torch.float32)
                yield f"{label} fwd", partial(gn_fwd, y, w, b, None, groups, 1e-5, "relu")
                yield f"{label} bwd", partial(gn_bwd, y, y, w, b, None, stat, stat, groups, "relu", True)


def _loss_launches(dtype_name: str, batch: int, n_local: int, width: int) -> Iterator[tuple[str, Callable]]:
    from .kernels import cosine_loss as cl
    from .kernels import restoration_loss as rl

    dtype = DTYPES[dtype_name]
    gt = _meta((batch, 1, 64, 64, 32), torch.float32)
    restored = _meta((batch, 1, 64, 64, 32), dtype)
    masks = [_meta((batch, 1, 64 // f, 64 // f, 32 // f), dtype) for f in (4, 2, 1)]
    grad = _meta((4,), torch.float32)
    for label, chosen, weights in (*((f"scale {s}", [masks[s]], [0.5]) for s in range(3)),
                                   ("all scales", masks, [0.5 / 3] * 3)):
        yield f"restoration_loss fwd {label}", lambda c=chosen, w=weights: rl.restoration_loss_forward(
            restored, c, gt, w)
        yield f"restoration_loss bwd {label}", lambda c=chosen, w=weights: rl.restoration_loss_backward(
            grad[: 1 + len(c)], restored, c, gt, w)
    for channels in (8 * width, 4 * width, 2 * width):
        for rows in (batch, batch * n_local):
            block_r, block_c = cl._blocks(rows, channels)
            pred, proj = _meta((rows * channels,), dtype), _meta((rows * channels,), torch.float32)
            blocks, terms = _meta((4, cl._BLOCK_FIELDS), torch.int32), _meta((4, cl._TERM_FIELDS), torch.int32)
            g = _meta((2,), torch.float32)
            yield f"cosine_pair_loss fwd {rows}x{channels}", lambda p=pred, q=proj, bl=blocks, t=terms, br=block_r, \
                bc=block_c: cl.cosine_forward(p, q, bl, t, 2, 1e-8, br, bc)
            yield f"cosine_pair_loss bwd {rows}x{channels}", lambda p=pred, q=proj, bl=blocks, t=terms, br=block_r, \
                bc=block_c, g=g: cl.cosine_backward(g, p, q, bl, t, 1e-8, br, bc)


def collect(dtypes=tuple(DTYPES), arch: str = "sm_90", width: int = 32, batch: int = 32) -> list[Launch]:
    """Every distinct kernel launch of the engine's launchers for the official model, on ``arch``."""
    layers = official_conv_layers(width, batch)
    unique: dict[str, Launch] = {}
    with recording(ARCHS[arch]["sms"]) as (launches, op):
        for dtype_name in dtypes:
            with tf32_policy(dtype_name == "tf32"):  # the conv kernels follow cuDNN's TF32 rule
                for label, fn in (*_conv_launches(dtype_name, layers), *_norm_launches(dtype_name, layers),
                                  *_loss_launches(dtype_name, batch, 6, width)):
                    op["name"] = f"{label} ({dtype_name})"
                    fn()
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


# ------------------------------------------------------------------------------------------------- compiling
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _config(launch: Launch) -> str:
    consts = ",".join(f"{k}={v}" for k, v in launch.constants.items() if v is not None)
    def flat(types):
        for t in types:
            yield from flat(t) if isinstance(t, tuple) else (t,)

    ptrs = ",".join(sorted({t[1:] for t in flat(launch.signature.values()) if t.startswith("*")}))
    return f"{ptrs} w{launch.num_warps} s{launch.num_stages} {consts}"


def resident_warps(regs: int, shared: int, warps: int, arch: str) -> int:
    """Warps per SM that fit by registers (allocated per warp in 256-register units), shared memory and block
    limits."""
    a = ARCHS[arch]
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = a["regs"] // (per_warp * warps)
    by_shared = a["shared_per_sm"] // shared if shared else a["blocks"]
    blocks = min(by_regs, by_shared, a["blocks"], a["warps"] // warps)
    return blocks * warps


def compile_launch(launch: Launch, arch: str = "sm_90") -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernels import conv3d_block, cosine_loss, norm_act, restoration_loss

    row = Row(launch.kernel, launch.op, _config(launch))
    fn = next(getattr(m, launch.kernel) for m in (conv3d_block, cosine_loss, norm_act, restoration_loss)
              if hasattr(m, launch.kernel))
    source = ASTSource(fn, launch.signature, constexprs=launch.constants)
    target = GPUTarget("cuda", ARCHS[arch]["capability"], 32)
    try:
        kernel = triton.compile(source, target=target,
                                options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    except Exception as exc:  # reported in the row: the table shows every configuration, not the first error
        row.note = f"compile error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
        return row
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    match = _RES.search(out)
    if match is None:
        row.note = f"cuobjdump printed no resource usage: {out.strip()[:200]}"
        return row
    row.regs, row.stack, static_shared, row.spill_bytes = (int(v) for v in match.groups())
    row.shared = max(static_shared, int(getattr(kernel.metadata, "shared", 0)))
    row.warps_per_sm = resident_warps(row.regs, row.shared, launch.num_warps, arch)
    return judge(row, arch)


def judge(row: Row, arch: str) -> Row:
    """Pass unless the kernel spills (and is not in ALLOWED_SPILLS) or needs more shared memory than a block gets."""
    problems = []
    if row.spill_bytes and row.kernel not in ALLOWED_SPILLS:
        problems.append(f"spills {row.spill_bytes} B")
    if row.shared > ARCHS[arch]["shared_per_block"]:
        problems.append(f"shared memory {row.shared} B > {ARCHS[arch]['shared_per_block']} B")
    row.ok = not problems
    row.note = "; ".join(problems) or ALLOWED_SPILLS.get(row.kernel, "")
    return row


def report(arch: str = "sm_90", dtypes=tuple(DTYPES), progress: bool = True) -> list[Row]:
    """Compile every collected configuration; rows in launch order."""
    from tqdm.auto import tqdm

    launches = collect(dtypes, arch)
    return [compile_launch(launch, arch) for launch in tqdm(launches, desc=f"compile {arch}", unit="kernel",
                                                             disable=not progress)]


COLUMNS = ("kernel", "config", "regs", "spill B", "shared B", "warps/SM", "pass", "first asked by")


def format_table(rows: list[Row], arch: str) -> str:
    cells = [(r.kernel, r.config, str(r.regs), str(r.spill_bytes), str(r.shared), str(r.warps_per_sm),
              "yes" if r.ok else "NO", r.op) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(COLUMNS)]
    lines = [f"Triton {_triton_version()} compile report for {arch} ({ARCHS[arch]['gpu']}): {len(rows)} kernel "
             "configurations of the official model (width 32, batch 32)",
             "  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)), "  ".join("-" * w for w in widths)]
    for r, c in zip(rows, cells):
        lines.append(("  ".join(v.ljust(w) for v, w in zip(c, widths)) + f"  {r.note}").rstrip())
    failed = [r for r in rows if not r.ok]
    lines.append(f"{len(failed)} of {len(rows)} configurations failed" if failed else "all configurations passed")
    return "\n".join(lines)


def _triton_version() -> str:
    import triton

    return triton.__version__


def rows_to_json(rows: list[Row], arch: str) -> dict:
    return {"arch": arch, "triton": _triton_version(), "torch": torch.__version__,
            "rows": [asdict(r) for r in rows]}


def run(arch: str, dtypes=tuple(DTYPES), json_path: str | None = None, progress: bool = True) -> int:
    """Print the report (and write it as JSON); 0 when every configuration passed. Runs in a child process when
    this one imported the kernels for the interpreter (their launchers would pick the interpreter's tiles)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    if interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "pcrlv2_fast.compile_report", arch, ",".join(dtypes)]
        return subprocess.run(cmd + ([json_path] if json_path else []), env=env).returncode
    rows = report(arch, dtypes, progress)
    print(format_table(rows, arch))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows_to_json(rows, arch), f, indent=1)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], tuple(sys.argv[2].split(",")), sys.argv[3] if len(sys.argv) > 3 else None))
