"""conv3d_block (kernels/conv3d_block.py) against the plain-PyTorch reference, plus its implementation chooser.

fp32 is compared element-wise with tight tolerances (TF32 off, so cuDNN is exact fp32 on a GPU too). bf16/fp16
use the relative rule err(fused, fp32 reference) <= 2 * err(eager same dtype, fp32 reference) + atol, the fp32
reference running on the low-precision input upcast (exactly) and the fp32 parameters. Shapes are odd on
purpose (C_in in {1, 3, 17, 32}, C_out in {1, 8, 17, 40}, spatial 3x5x7, 4x6x5, 3x4x5) so that tiles are
partial along M, K and C_out, both K loops (flat for C < 16, tap by tap otherwise, with and without a
channel mask) run in the forward, data-gradient and weight-gradient kernels, and C_out = 40 spans two tiles.
The batch statistics (mean, biased variance) are also checked against fp64 on outputs with a large mean, where
E[y^2] - E[y]^2 in fp32 fails.
"""

import json

import pytest
import torch

from tests import requirements
from tests.helpers import assert_close

requirements.importorskip("triton", "triton")

from pcrlv2_fast.kernels import conv3d_block as cb  # noqa: E402  (after the conftest chose the interpreter)

from pcrlv2_fast.reference import conv3d_block as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# fp32 (atol, rtol): y, dx (magnitudes ~1); weight/bias grads (sums over N*D*H*W ~ 200 terms); the channel
# mean and variance (magnitudes ~1, fp32 reductions in another order than torch's).
FP32_TOL = {"value": (2e-5, 1e-5), "sum": (2e-4, 1e-5), "stat": (2e-6, 1e-5)}
STATS = ("mean", "var")
# low precision: the atol added to 2 * eager error, relative to the largest reference magnitude.
LOW_REL_ATOL = {BF16: 2e-3, F16: 5e-4}
# Unit roundoff (half an ulp, relative) of the low-precision dtypes.
ROUNDOFF = {BF16: 2.0**-8, F16: 2.0**-11}


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off for both implementations (it is torch's default for cuDNN convolutions on Ampere+)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def _make_x(N, C, spatial, layout, dtype, seed=0):
    """(N, C, *spatial) in layout 'ncdhw', 'ndhwc' (channels_last_3d), 'strided' (a spatial transpose of a
    dense tensor: neither layout) or 'strided_cl' (a slice of a channels-last tensor)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        x = torch.randn(N, C, *spatial[::-1], generator=g).to(dtype).to(DEVICE).transpose(2, 4)
    elif layout == "strided_cl":
        base = torch.randn(N, C, spatial[0] + 1, *spatial[1:], generator=g).to(dtype).to(DEVICE)
        x = base.contiguous(memory_format=torch.channels_last_3d)[:, :, 1:]
    else:
        x = torch.randn(N, C, *spatial, generator=g).to(dtype).to(DEVICE)
        if layout == "ndhwc":
            x = x.contiguous(memory_format=torch.channels_last_3d)
    assert x.shape == (N, C, *spatial)
    return x


def _params(C_in, C_out, bias, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(C_out, C_in, 3, 3, 3, generator=g) / (27 * C_in) ** 0.5).to(DEVICE)
    b = (torch.randn(C_out, generator=g) * 0.5).to(DEVICE) if bias else None
    return w, b


def _run(fn, x, w, b, dy, g_stats):
    """Forward + backward of sum(y * dy) (+ the channel mean and variance weighted by g_stats): outputs, grads."""
    x = x.detach().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    y, mean, var = fn(x, w, b)
    loss = (y.float() * dy.float()).sum()
    if g_stats is not None:
        loss = loss + (mean * g_stats[0]).sum() + (var * g_stats[1]).sum()
    loss.backward()
    return {"y": y.detach(), "mean": mean.detach(), "var": var.detach(), "dx": x.grad, "dw": w.grad,
            "db": b.grad if b is not None else None}


def _g_stats(C_out, n, g):
    """Gradients on (mean, var), scaled by n so that their share of dy ((g_m + 2 (y - mean) g_v) / n) is of the
    size of dy itself."""
    return (torch.randn(C_out, generator=g).to(DEVICE) * n, torch.randn(C_out, generator=g).to(DEVICE) * 0.1 * n)


def _compare(fused, expected, eager, dtype):
    errs = {}
    for k, v in fused.items():
        if v is None:
            assert expected[k] is None
            continue
        e = expected[k]
        errs[k] = f"{(v.double() - e.double()).abs().max().item():.2g}"
        if dtype == F32:
            atol, rtol = FP32_TOL["value" if k in ("y", "dx") else "stat" if k in STATS else "sum"]
            assert_close(v, e, atol=atol, rtol=rtol, what=k)
        else:
            eager_err = (eager[k].double() - e.double()).abs().max().item()
            errs[k] += f" (eager {eager_err:.2g}, max|ref| {e.abs().max().item():.2g})"
            atol = 2 * eager_err + LOW_REL_ATOL[dtype] * e.abs().max().item()
            assert_close(v, e, atol=atol, what=f"{k} (eager err {eager_err:.3g})")
    return errs


# (C_in, C_out, spatial, layout, dtype, bias, grads on mean/var)
CASES = [
    (1, 8, (3, 5, 7), "ncdhw", F32, True, False),
    (3, 17, (4, 6, 5), "ndhwc", F32, True, True),
    (17, 1, (3, 5, 7), "strided", F32, True, False),
    (17, 17, (4, 6, 5), "ndhwc", F32, False, True),
    (32, 40, (3, 4, 5), "strided_cl", F32, True, False),
    (3, 8, (3, 5, 7), "strided_cl", BF16, True, True),
    (17, 17, (4, 6, 5), "ndhwc", BF16, True, False),
    (1, 17, (4, 6, 5), "ncdhw", F16, True, False),
    (17, 8, (3, 5, 7), "ndhwc", F16, False, True),
    # Two channel chunks per tap, the second partial (the weight gradient's three-tap tiles and their stores).
    (41, 9, (3, 4, 5), "ndhwc", F32, True, False),
]


@pytest.mark.parametrize(
    "C_in,C_out,spatial,layout,dtype,bias,stat_grads", CASES,
    ids=[f"{c[0]}to{c[1]}-{'x'.join(map(str, c[2]))}-{c[3]}-{str(c[4])[6:]}{'' if c[5] else '-nobias'}"
         f"{'-statgrads' if c[6] else ''}" for c in CASES])
def test_triton_matches_reference(C_in, C_out, spatial, layout, dtype, bias, stat_grads):
    x = _make_x(2, C_in, spatial, layout, dtype)
    w, b = _params(C_in, C_out, bias)
    g = torch.Generator().manual_seed(7)
    # dy in NCDHW even for a channels-last y; rounded to the dtype so the fp32 reference sees the same values.
    dy = torch.randn(2, C_out, *spatial, generator=g).to(dtype).to(DEVICE)
    g_stats = _g_stats(C_out, 2 * spatial[0] * spatial[1] * spatial[2], g) if stat_grads else None
    fused = _run(lambda x, w, b: cb.conv3d_bn_stats(x, w, b, impl="triton"), x, w, b, dy, g_stats)
    assert fused["y"].dtype == dtype and fused["dx"].dtype == dtype
    assert fused["y"].is_contiguous(memory_format=torch.channels_last_3d)
    assert fused["mean"].dtype == F32 and fused["var"].dtype == F32
    assert fused["dw"].dtype == F32 and fused["dx"].shape == x.shape
    expected = _run(ref.conv3d_bn_stats, x.float(), w, b, dy, g_stats)
    eager = None if dtype == F32 else _run(ref.conv3d_bn_stats, x, w, b, dy, g_stats)
    errs = _compare(fused, expected, eager, dtype)
    print("; ".join(f"{k} {v}" for k, v in errs.items()))
    if dtype != F32:
        _check_rounding_only(fused, x, w, b, dy, g_stats, dtype)


def _check_rounding_only(fused, x, w, b, dy, g_stats, dtype):
    """The stronger low-precision check: against fp32 math on the operands as the kernels see them (x, weight,
    bias rounded to the dtype), the only error left is the final rounding, at most one ulp (two unit
    roundoffs: the accumulation order may move a value across a rounding boundary). The channel mean and
    variance come from the fp32 accumulator, so they match to fp32 accuracy. With gradients on them,
    dy + (g_m + 2 (y - mean) g_v) / n is rounded to the dtype before the backward GEMMs, an error relative to
    the largest gradient instead."""
    u = ROUNDOFF[dtype]
    rb = b.to(dtype).float() if b is not None else None
    exact = _run(ref.conv3d_bn_stats, x.float(), w.to(dtype).float(), rb, dy, g_stats)
    for k, v in fused.items():
        if v is None:
            continue
        e = exact[k]
        scale = e.abs().max().item()
        if k in STATS:
            assert_close(v, e, atol=1e-6 * scale, rtol=1e-5, what=f"{k} vs rounded-operand fp32")
        elif g_stats is not None and k != "y":
            assert_close(v, e, atol=2 * u * scale, rtol=2 * u, what=f"{k} vs rounded-operand fp32")
        else:
            assert_close(v, e, atol=1e-3 * u * scale, rtol=2 * u, what=f"{k} vs rounded-operand fp32")


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_torch_path_matches_reference(impl):
    """The cuDNN path (and "auto", which is torch on CPU) gives the same API outputs as the reference."""
    x = _make_x(2, 3, (3, 5, 7), "strided", F32)
    w, b = _params(3, 8, True)
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(2, 8, 3, 5, 7, generator=g).to(DEVICE)
    g_stats = _g_stats(8, 2 * 3 * 5 * 7, g)
    choices = dict(cb.CHOOSER.choices)
    out = _run(lambda x, w, b: cb.conv3d_bn_stats(x, w, b, impl=impl), x, w, b, dy, g_stats)
    expected = _run(ref.conv3d_bn_stats, x, w, b, dy, g_stats)
    _compare(out, expected, None, F32)
    assert out["y"].is_contiguous(memory_format=torch.channels_last_3d)
    if DEVICE == "cpu":
        assert cb.CHOOSER.choices == choices, "auto must not measure on CPU"


@pytest.mark.parametrize("which", STATS)
def test_stats_alone_carry_gradients(which):
    """A loss that reads only the channel mean or variance (y's own gradient is None) still reaches x, weight and
    bias."""
    x = _make_x(2, 3, (3, 4, 5), "ndhwc", F32)
    w, b = _params(3, 8, True)
    gs = torch.randn(8, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    grads = []
    for fn in (lambda x, w, b: cb.conv3d_bn_stats(x, w, b, impl="triton"), ref.conv3d_bn_stats):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        out = dict(zip(("y", *STATS), fn(*leaves)))
        grads.append(torch.autograd.grad((out[which] * gs).sum(), leaves))
    for name, g, g_ref in zip(("dx", "dw", "db"), *grads):
        assert_close(g, g_ref, *FP32_TOL["stat"], what=name)


LARGE_MEAN = [("triton", F32), ("torch", F32), ("triton", BF16)]


@pytest.mark.parametrize("impl,dtype", LARGE_MEAN, ids=[f"{i}-{str(d)[6:]}" for i, d in LARGE_MEAN])
def test_statistics_of_a_large_mean_output_match_fp64(impl, dtype):
    """Outputs of mean ~1000 and spread ~0.7 (bias 1000): mean and variance to 1e-4 relative of fp64 math on the
    operands as the kernels see them. The fp32 accumulator holds such values to ~3e-5, which bounds the
    variance's agreement at ~1e-5 relative; E[y^2] - E[y]^2 from the fp32 sums of the same y cancels
    catastrophically (errors of tens of percent) and is checked to fail the same tolerance."""
    x = _make_x(2, 3, (4, 6, 5), "ndhwc", dtype)
    w, b = _params(3, 8, True)
    b = b + 1000.0
    y, mean, var = cb.conv3d_bn_stats(x, w, b, impl=impl)
    assert mean.dtype == F32 and var.dtype == F32
    # fp64 on the rounded operands; the torch path's statistics are those of y as rounded to the dtype.
    y64 = torch.nn.functional.conv3d(x.double(), w.to(dtype).double(), b.to(dtype).double(), padding=1)
    if impl == "torch":
        y64 = y64.to(dtype).double()
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3, 4), correction=0)
    assert_close(mean, mean64, atol=0.0, rtol=1e-6, what="mean")
    assert_close(var, var64, atol=0.0, rtol=1e-4, what="var")
    yf = y.float()
    n = y.numel() // y.shape[1]
    naive = (yf * yf).sum((0, 2, 3, 4)) / n - (yf.sum((0, 2, 3, 4)) / n) ** 2
    naive_err = ((naive.double() - var64) / var64).abs().max().item()
    assert naive_err > 1e-2, f"E[y^2] - E[y]^2 unexpectedly accurate here ({naive_err:.3g}): the test lost its point"
    print(f"var rel err: {((var.double() - var64) / var64).abs().max().item():.2g}, "
          f"E[y^2] - E[y]^2: {naive_err:.2g}")


def test_stats_combine_matches_fp64_and_is_deterministic():
    """Chan's merge of per-tile (count, hi + lo mean, M2) partials over several levels, on data of mean 1000."""
    g = torch.Generator().manual_seed(0)
    counts = [64] * 8 + [23]  # the last tile partial, as past the end of M
    data = [torch.randn(c, 5, generator=g, dtype=torch.float64) * 0.5 + 1000.0 for c in counts]
    hi = torch.stack([d.mean(0) for d in data]).float()
    lo = torch.stack([(d - h.double()).mean(0) for d, h in zip(data, hi)]).float()
    m2 = torch.stack([((d - d.mean(0)) ** 2).sum(0) for d in data]).float()
    cnt = torch.tensor(counts, dtype=torch.float32)[:, None].expand(-1, 5)
    part = torch.stack([cnt, hi, lo, m2]).contiguous().to(DEVICE)
    mean, var = cb._combine_stats(part)
    var64, mean64 = torch.var_mean(torch.cat(data), dim=0, correction=0)
    assert_close(mean, mean64, atol=0.0, rtol=1e-7, what="mean")
    assert_close(var, var64, atol=0.0, rtol=1e-6, what="var")
    mean2, var2 = cb._combine_stats(part)
    assert torch.equal(mean, mean2) and torch.equal(var, var2), "deterministic"


def test_colsum_two_levels_is_exact_order_sum():
    g = torch.Generator().manual_seed(0)
    part = torch.randn(2, 37, 19, generator=g, dtype=torch.float64).float().to(DEVICE)
    out = cb._colsum(part)
    assert out.shape == (2, 19)
    assert_close(out, part.double().sum(1), atol=1e-5, what="column sums")
    assert torch.equal(out, cb._colsum(part)), "deterministic"


def test_autocast_casts_like_a_convolution():
    x = _make_x(2, 3, (3, 4, 5), "ncdhw", F32)
    w, b = _params(3, 8, True)
    w.requires_grad_()
    with torch.autocast(DEVICE, dtype=BF16):
        y, _, _ = cb.conv3d_bn_stats(x, w, b, impl="triton")
        y_ref = torch.nn.functional.conv3d(x, w, b, padding=1)
    assert y.dtype == BF16 == y_ref.dtype
    assert_close(y.float(), y_ref.float(), atol=2e-2, what="y under autocast")
    y.float().sum().backward()
    assert w.grad.dtype == F32


def test_invalid_arguments():
    x = _make_x(1, 3, (3, 4, 5), "ncdhw", F32)
    w, b = _params(3, 4, True)
    with pytest.raises(ValueError, match="impl must be"):
        cb.conv3d_bn_stats(x, w, b, impl="cudnn")
    with pytest.raises(ValueError, match="weight must have shape"):
        cb.conv3d_bn_stats(x, w[:, :2], b)
    with pytest.raises(ValueError, match="bias must have shape"):
        cb.conv3d_bn_stats(x, w, b[:3])
    with pytest.raises(ValueError, match="N, C_in, D, H, W"):
        cb.conv3d_bn_stats(x[0], w, b)
    with pytest.raises(TypeError, match="x's dtype"):
        torch.ops.pcrlv2.conv3d_bn_stats_fwd(x, w.double(), b, "torch")


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch with dynamic shapes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 3, 4, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(5, 3, 3, 3, 3, generator=g).to(DEVICE)
    b = torch.randn(5, generator=g).to(DEVICE)
    dy = torch.randn(2, 5, 2, 3, 4, generator=g).to(DEVICE)
    ops = torch.ops.pcrlv2
    cases = [
        (ops.conv3d_bn_stats_fwd.default, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), "triton")),
        (ops.conv3d_bn_stats_fwd.default, (x.detach(), w.detach(), None, "torch")),
        (ops.conv3d_bn_stats_bwd.default, (dy, x.detach(), w.detach(), True, True, True, "triton")),
        (ops.conv3d_bn_stats_bwd.default, (dy, x.detach(), w.detach(), False, True, False, "torch")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_traces_without_graph_breaks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 3, 4, 5, generator=g).to(DEVICE)
    w = (torch.randn(8, 3, 3, 3, 3, generator=g) * 0.2).to(DEVICE).requires_grad_()
    b = torch.randn(8, generator=g).to(DEVICE).requires_grad_()

    def f(x):
        y, mean, var = cb.conv3d_bn_stats(x, w, b, impl="triton")
        return ((y - mean.view(1, -1, 1, 1, 1)) * var.view(1, -1, 1, 1, 1).rsqrt()).square().mean() + y.mean()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (f, compiled):
        xg = x.clone().requires_grad_()
        loss = fn(xg)
        results.append((loss, *torch.autograd.grad(loss, (xg, w, b))))
    for name, eager, comp in zip(("loss", "dx", "dw", "db"), *results):
        assert_close(comp, eager, atol=1e-6, rtol=1e-6, what=name)


# ----------------------------------------------------------------------------------------------- chooser
class _FakeTimer:
    """Stands in for the CUDA timer: fixed milliseconds per candidate name, counting the calls."""

    def __init__(self, ms):
        self.ms, self.calls = ms, []

    def __call__(self, fn):
        name = fn()
        self.calls.append(name)
        return self.ms[name]


def _candidates():
    return {"torch": lambda: "torch", "triton": lambda: "triton"}


def _agree(candidate, reference):
    return None


def test_chooser_measures_once_prints_and_caches(tmp_path):
    lines = []
    timer = _FakeTimer({"torch": 1.23, "triton": 0.98})
    chooser = cb.ImplChooser(cache_file=tmp_path / "choices.json", timer=timer, log=lines.append, compare=_agree)
    assert chooser.choose("k1", "conv3d_block 32->64 64x64x32 N=8 bf16 fwd", _candidates()) == "triton"
    assert lines == ["conv3d_block 32->64 64x64x32 N=8 bf16 fwd: torch 1.230 ms, triton 0.980 ms -> triton"]
    # Remembered: no new measurement, no new line.
    assert chooser.choose("k1", "label", _candidates()) == "triton"
    assert timer.calls == ["torch", "triton"] and len(lines) == 1
    timer.ms = {"torch": 0.5, "triton": 0.7}
    assert chooser.choose("k2", "other", _candidates()) == "torch"
    assert lines[-1] == "other: torch 0.500 ms, triton 0.700 ms -> torch"
    assert json.loads((tmp_path / "choices.json").read_text()) == {"k1": "triton", "k2": "torch"}

    # A new process reads the file back: no measurement, one "cached" line per key.
    lines2 = []
    timer2 = _FakeTimer({"torch": 9.0, "triton": 9.0})
    chooser2 = cb.ImplChooser(cache_file=tmp_path / "choices.json", timer=timer2, log=lines2.append,
                               compare=_agree)
    assert chooser2.choose("k1", "label1", _candidates()) == "triton"
    assert chooser2.choose("k1", "label1", _candidates()) == "triton"
    assert timer2.calls == [] and lines2 == [f"label1: triton (cached in {tmp_path / 'choices.json'})"]


def test_chooser_without_file_and_with_a_candidate_that_does_not_fit(tmp_path):
    lines = []

    def too_big():
        raise cb.triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")

    timer = _FakeTimer({"torch": 2.0})
    chooser = cb.ImplChooser(cache_file=None, timer=timer, log=lines.append, compare=_agree)
    assert chooser.choose("k", "lbl", {"torch": lambda: "torch", "triton": too_big}) == "torch"
    assert "does not fit" in lines[0] and lines[1] == "lbl: torch 2.000 ms -> torch"

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    chooser = cb.ImplChooser(cache_file=bad, timer=_FakeTimer({"torch": 2.0, "triton": 1.0}), log=lines.append,
                             compare=_agree)
    assert chooser.choose("k", "lbl", _candidates()) == "triton"
    assert any("unreadable" in line for line in lines)
    assert json.loads(bad.read_text()) == {"k": "triton"}


@pytest.mark.parametrize("error", [RuntimeError("ptxas fatal: Unresolved extern function"),
                                   ValueError("CompilationError at 12:4: unsupported"),
                                   OSError("cannot write the kernel cache")])
def test_any_triton_failure_falls_back_to_torch_logged_once(error):
    lines = []

    def broken():
        raise error

    timer = _FakeTimer({"torch": 3.0})
    chooser = cb.ImplChooser(cache_file=None, timer=timer, log=lines.append, compare=_agree)
    for key in ("k1", "k2"):
        assert chooser.choose(key, f"lbl {key}", {"torch": lambda: "torch", "triton": broken}) == "torch"
    failures = [line for line in lines if "failed" in line]
    assert len(failures) == 1 and type(error).__name__ in failures[0] and str(error) in failures[0]
    assert lines[-1] == "lbl k2: torch 3.000 ms -> torch"
    assert timer.calls == ["torch", "torch"]


def test_a_triton_candidate_that_disagrees_is_rejected(tmp_path):
    lines = []
    x = torch.ones(4, 3)

    def reference():
        return x, None

    def far():
        return 2 * x, None

    def close():  # within fp32's tolerance; None where a gradient was not asked for
        return x + 1e-6, None

    timer = {reference: 5.0, far: 1.0, close: 1.0}.__getitem__
    chooser = cb.ImplChooser(cache_file=tmp_path / "c.json", timer=timer, log=lines.append)
    assert chooser.choose("k", "lbl", {"torch": reference, "triton": far}) == "torch"
    assert "disagrees with torch (output 0 differs by 1.00e+00" in lines[0]
    assert chooser.choose("k2", "lbl2", {"torch": reference, "triton": close}) == "triton"
    # A cached Triton choice is checked again in a new process; now it disagrees, so it is measured anew.
    again = cb.ImplChooser(cache_file=tmp_path / "c.json", timer=lambda fn: 1.0, log=lines.append)
    assert again.choose("k2", "lbl2", {"torch": lambda: (x, None), "triton": lambda: (x * 3, None)}) == "torch"
    assert "disagrees" in lines[-2] and lines[-1].endswith("-> torch")


def test_an_unwritable_cache_keeps_choices_in_memory_with_one_warning(tmp_path):
    lines = []
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    timer = _FakeTimer({"torch": 2.0, "triton": 1.0})
    chooser = cb.ImplChooser(cache_file=blocker / "choices.json", timer=timer, log=lines.append, compare=_agree)
    assert chooser.choose("k1", "lbl1", _candidates()) == "triton"
    assert chooser.choose("k2", "lbl2", _candidates()) == "triton"
    assert chooser.choose("k1", "lbl1", _candidates()) == "triton"
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "cannot write the choice cache" in warnings[0]
    assert timer.calls == ["torch", "triton", "torch", "triton"] and chooser.choices == {"k1": "triton",
                                                                                        "k2": "triton"}


def _auto_on_cpu(monkeypatch, lines, timer):
    """Make impl="auto" consult a fresh chooser on CPU tensors (Triton under the interpreter)."""
    monkeypatch.setattr(cb, "_measures", lambda x: True)
    chooser = cb.ImplChooser(cache_file=None, timer=timer, log=lines.append)
    monkeypatch.setattr(cb, "CHOOSER", chooser)
    return chooser


def _prefer_triton(fn):
    """A timer that finds the Triton candidate faster: the op's candidates are lambdas calling triton_* or
    torch_* launchers."""
    return 1.0 if any(name.startswith("triton_") for name in fn.__code__.co_names) else 2.0


@pytest.mark.skipif(DEVICE == "cuda", reason="forces the chooser onto CPU tensors under the interpreter")
def test_auto_chooses_fwd_dgrad_wgrad_separately_and_survives_failures(monkeypatch):
    lines = []
    chooser = _auto_on_cpu(monkeypatch, lines, _prefer_triton)
    real_backward = cb.triton_backward

    def wgrad_breaks(dy, x, weight, need_dx, need_dw, need_db):
        if need_dw:
            raise RuntimeError("ptxas fatal: wgrad kernel")
        return real_backward(dy, x, weight, need_dx, need_dw, need_db)

    monkeypatch.setattr(cb, "triton_backward", wgrad_breaks)
    x = _make_x(2, 5, (3, 4, 5), "ndhwc", torch.float32)
    w, b = _params(5, 6, True)
    dy = torch.randn(2, 6, 3, 4, 5, device=DEVICE)
    out = _run(lambda x, w, b: cb.conv3d_bn_stats(x, w, b, impl="auto"), x, w, b, dy, None)
    expected = _run(ref.conv3d_bn_stats, x, w, b, dy, None)
    for name, value in out.items():
        assert_close(value, expected[name], atol=1e-4, rtol=1e-4, what=name)
    by_direction = {key.rsplit(" ", 2)[-2]: choice for key, choice in chooser.choices.items()}
    assert by_direction == {"fwd": "triton", "dgrad": "triton", "wgrad": "torch"}
    assert sum("ptxas fatal: wgrad kernel" in line for line in lines) == 1


@pytest.mark.skipif(DEVICE == "cuda", reason="forces the chooser onto CPU tensors under the interpreter")
def test_auto_demotes_a_chosen_triton_kernel_that_fails_later(monkeypatch):
    lines = []
    chooser = _auto_on_cpu(monkeypatch, lines, _prefer_triton)
    x = _make_x(2, 5, (3, 4, 5), "ndhwc", torch.float32)
    w, b = _params(5, 6, True)
    cb.conv3d_bn_stats(x, w, b, impl="auto")
    (key,) = chooser.choices
    assert chooser.choices[key] == "triton"
    monkeypatch.setattr(cb, "triton_forward", lambda *a: (_ for _ in ()).throw(RuntimeError("illegal address")))
    y, mean, var = cb.conv3d_bn_stats(x, w, b, impl="auto")
    ry, rmean, rvar = ref.conv3d_bn_stats(x, w, b)
    assert_close(y, ry, atol=1e-4, rtol=1e-4, what="y after the fallback")
    assert chooser.choices[key] == "torch" and "illegal address" in lines[-1]


def test_int32_guard_refuses_only_forced_triton(monkeypatch):
    x = torch.empty(64, 128, 128, 128, 64, device="meta")  # 128 channels x 67 M voxels: past int32 offsets
    w = torch.empty(128, 128, 3, 3, 3, device="meta")
    assert not cb._fits_int32(x, w) and cb._fits_int32(x[:1, :, :16], w)
    with pytest.raises(ValueError, match="int32 offsets; use impl='auto'"):
        cb._check_inputs(x, w, None, "triton")
    cb._check_inputs(x, w, None, "auto")
    monkeypatch.setattr(cb, "_measures", lambda x: True)
    monkeypatch.setattr(cb, "CHOOSER", None)  # auto must not even ask
    assert cb._dispatch("auto", x, w, "fwd", lambda: "torch", lambda: "triton") == "torch"


def test_shape_key_names_shape_dtype_direction_and_stack():
    x = torch.empty(8, 32, 64, 64, 32, device="meta", dtype=BF16)
    w = torch.empty(64, 32, 3, 3, 3, device="meta", dtype=BF16)
    key, label = cb._shape_key(x, w, "fwd")
    assert label == "conv3d_block 32->64 64x64x32 N=8 bf16 fwd"
    assert key.endswith(label) and torch.__version__ in key and cb.triton.__version__ in key
    key32, label32 = cb._shape_key(x.float(), w.float(), "dgrad")
    assert label32 == "conv3d_block 32->64 64x64x32 N=8 fp32 dgrad ieee"  # TF32 off (fixture)
    assert key32 != key


@pytest.mark.skipif(DEVICE != "cuda", reason="the measured choice runs on CUDA only")
def test_auto_measures_on_cuda(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(cb, "CHOOSER", cb.ImplChooser(cache_file=tmp_path / "c.json", log=lines.append))
    x = _make_x(2, 17, (4, 6, 5), "ndhwc", BF16)
    w, b = _params(17, 8, True)
    dy = torch.randn(2, 8, 4, 6, 5, device=DEVICE, dtype=BF16)
    out = _run(lambda x, w, b: cb.conv3d_bn_stats(x, w, b, impl="auto"), x, w, b, dy, None)
    expected = _run(ref.conv3d_bn_stats, x.float(), w, b, dy, None)
    eager = _run(ref.conv3d_bn_stats, x, w, b, dy, None)
    _compare(out, expected, eager, BF16)
    assert len(lines) == 2 and " fwd: " in lines[0] and " bwd: " in lines[1]
