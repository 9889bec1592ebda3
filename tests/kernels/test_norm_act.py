"""Fused norm + activation kernels (kernels/norm_act.py) against the plain-PyTorch reference.

fp32 is compared element-wise with tight tolerances. bf16/fp16 use the relative rule
err(fused, fp32 reference) <= 2 * err(eager same dtype, fp32 reference) + atol, where the fp32 reference
runs on the low-precision values upcast (exactly) to fp32. Shapes are odd on purpose (C in {1, 3, 17, 64},
spatial 3x5x7 and 5x7x9) so that tiles are partial along both axes.
"""

import pytest
import torch

from tests import requirements
from tests.helpers import assert_close

requirements.importorskip("triton", "triton")

from pcrlv2_fast.kernels import norm_act  # noqa: E402  (after the conftest chose the interpreter)

from pcrlv2_fast.reference import norm_act as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# fp32: (atol, rtol) for y and dx, and for parameter grads (sums over N*S elements, magnitudes ~10-100).
FP32_TOL = {"value": (2e-5, 1e-5), "param": (1e-4, 1e-5)}
# low precision: the atol added to 2 * eager error.
LOW_ATOL = {BF16: 1e-3, F16: 1e-4}


def _make_x(N, C, spatial, layout, dtype, offset=0.5, scale=2.0, seed=0):
    """(N, C, *spatial) input in the given layout: 'ncdhw', 'ndhwc' (channels_last_3d), 'strided' (a spatial
    transpose: neither layout, nearer NCDHW) or 'strided_cl' (a slice of a channels-last tensor)."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(1, C, 1, 1, 1, generator=g) * offset
    if layout == "strided":
        base = torch.randn(N, C, *spatial[::-1], generator=g) * scale + shift
        x = base.to(dtype).to(DEVICE).transpose(2, 4)
    elif layout == "strided_cl":
        base = torch.randn(N, C, spatial[0] + 1, *spatial[1:], generator=g) * scale + shift
        x = base.to(dtype).to(DEVICE).contiguous(memory_format=torch.channels_last_3d)[:, :, 1:]
    else:
        x = (torch.randn(N, C, *spatial, generator=g) * scale + shift).to(dtype).to(DEVICE)
        if layout == "ndhwc":
            x = x.contiguous(memory_format=torch.channels_last_3d)
    assert x.shape == (N, C, *spatial)
    return x


def _params(C, affine, act, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g) + 0.5).to(DEVICE) if affine else None
    b = (torch.randn(C, generator=g) * 0.5).to(DEVICE) if affine else None
    a = None
    if act in ("prelu", "prelu1"):
        a = (torch.rand(C if act == "prelu" else 1, generator=g) * 0.5).to(DEVICE)
    return w, b, a


def _run(fn, x, params, dy):
    """Forward + backward; returns (y, dx, {name: grad}) with params re-leafed so each run owns its grads."""
    x = x.detach().requires_grad_()
    leaves = {k: (p.detach().clone().requires_grad_() if p is not None else None) for k, p in params.items()}
    y = fn(x, **leaves)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, {k: p.grad for k, p in leaves.items() if p is not None}


def _check(actual, expected, eager, dtype, kind, what):
    if dtype == F32:
        atol, rtol = FP32_TOL[kind]
        assert_close(actual, expected, atol=atol, rtol=rtol, what=what)
        return
    eager_err = (eager.double() - expected.double()).abs().max().item()
    assert_close(actual, expected, atol=2 * eager_err + LOW_ATOL[dtype], what=f"{what} (eager err {eager_err:.3g})")


def _compare(fused_fn, ref_fn, x, params, dtype, expect_cl):
    # NCDHW even for an NDHWC x; rounded to the dtype so that the fp32 reference sees the same values.
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    y, dx, grads = _run(fused_fn, x, params, dy)
    assert y.dtype == dtype and dx.dtype == dtype
    cl_fmt = torch.channels_last_3d
    assert y.is_contiguous(memory_format=cl_fmt) if expect_cl else y.is_contiguous(), "output layout"
    assert dx.shape == x.shape
    y32, dx32, grads32 = _run(ref_fn, x.float(), params, dy)
    y_e, dx_e, grads_e = (None, None, {}) if dtype == F32 else _run(ref_fn, x, params, dy)
    _check(y, y32, y_e, dtype, "value", "y")
    _check(dx, dx32, dx_e, dtype, "value", "dx")
    assert grads.keys() == grads32.keys()
    for k in grads:
        assert grads[k].dtype == params[k].dtype and grads[k].shape == params[k].shape
        _check(grads[k], grads32[k], grads_e.get(k), dtype, "param", f"d{k}")


def _act_name(act):
    return "prelu" if act == "prelu1" else act


# (C, spatial, layout, dtype, act, training, affine, momentum)
BN_CASES = [
    (1, (3, 5, 7), "ncdhw", F32, "relu", True, True, 0.1),
    (3, (5, 7, 9), "ndhwc", F32, "elu", True, True, 0.3),
    (17, (3, 5, 7), "strided", F32, "prelu", True, True, 0.1),
    (64, (3, 5, 7), "ndhwc", F32, "prelu1", True, True, 0.1),
    (17, (3, 5, 7), "ncdhw", F32, "relu", True, False, 0.1),
    (64, (5, 7, 9), "ncdhw", F32, "elu", True, True, 0.1),
    (3, (3, 5, 7), "ncdhw", F32, "none", False, True, 0.1),
    (17, (5, 7, 9), "ncdhw", BF16, "relu", True, True, 0.1),
    (64, (3, 5, 7), "ndhwc", F16, "elu", True, True, 0.1),
    (17, (3, 5, 7), "ndhwc", BF16, "sigmoid", False, True, 0.1),
    (64, (3, 5, 7), "strided_cl", F16, "prelu", True, True, 0.1),
    (3, (5, 7, 9), "ncdhw", F16, "sigmoid", True, True, 0.1),
    (17, (3, 5, 7), "strided", BF16, "prelu1", False, True, 0.1),
]


@pytest.mark.parametrize("C,spatial,layout,dtype,act,training,affine,momentum", BN_CASES,
                         ids=[f"C{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}-{str(c[3])[6:]}-{c[4]}-"
                              f"{'train' if c[5] else 'eval'}{'' if c[6] else '-noaffine'}" for c in BN_CASES])
def test_bn_act3d_matches_reference(C, spatial, layout, dtype, act, training, affine, momentum):
    x = _make_x(2, C, spatial, layout, dtype)
    w, b, a = _params(C, affine, act)
    g = torch.Generator().manual_seed(3)
    rm0 = (torch.randn(C, generator=g) * 0.2).to(DEVICE)
    rv0 = (torch.rand(C, generator=g) + 0.5).to(DEVICE)
    stats = {}

    def runner(module):
        def fn(x, w, b, a):
            rm, rv = rm0.clone(), rv0.clone()
            stats.setdefault(module.__name__, []).append((rm, rv))
            return module.bn_act3d(x, w, b, rm, rv, training, momentum, 1e-5, _act_name(act), a)
        return fn

    _compare(runner(norm_act), runner(ref), x, {"w": w, "b": b, "a": a}, dtype,
             expect_cl=layout in ("ndhwc", "strided_cl"))
    (rm, rv), (rm32, rv32) = stats[norm_act.__name__][0], stats[ref.__name__][0]
    if not training:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval mode must not touch the running stats"
    else:
        assert not torch.equal(rm, rm0)
    # The fused statistics are fp32 over the same (upcast) values as the fp32 reference: tight for every dtype.
    assert_close(rm, rm32, atol=1e-6, rtol=1e-5, what="running_mean")
    assert_close(rv, rv32, atol=1e-6, rtol=1e-5, what="running_var")


# (C, groups, spatial, layout, dtype, act, affine)
GN_CASES = [
    (64, 4, (3, 5, 7), "ndhwc", F32, "relu", True),
    (17, 1, (5, 7, 9), "ncdhw", F32, "elu", True),
    (17, 17, (3, 5, 7), "ndhwc", F32, "prelu", False),
    (3, 3, (5, 7, 9), "strided", F32, "none", True),
    (1, 1, (3, 5, 7), "ncdhw", F32, "sigmoid", True),
    (64, 64, (3, 5, 7), "ncdhw", BF16, "relu", False),
    (64, 4, (3, 5, 7), "strided_cl", F16, "prelu1", True),
    (17, 1, (3, 5, 7), "ndhwc", BF16, "elu", True),
    (3, 3, (5, 7, 9), "ndhwc", F16, "sigmoid", True),
]


@pytest.mark.parametrize("C,groups,spatial,layout,dtype,act,affine", GN_CASES,
                         ids=[f"C{c[0]}-G{c[1]}-{'x'.join(map(str, c[2]))}-{c[3]}-{str(c[4])[6:]}-{c[5]}"
                              f"{'' if c[6] else '-noaffine'}" for c in GN_CASES])
def test_gn_act3d_matches_reference(C, groups, spatial, layout, dtype, act, affine):
    x = _make_x(2, C, spatial, layout, dtype, seed=5)
    w, b, a = _params(C, affine, act, seed=6)

    def runner(module):
        return lambda x, w, b, a: module.gn_act3d(x, groups, w, b, 1e-5, _act_name(act), a)

    _compare(runner(norm_act), runner(ref), x, {"w": w, "b": b, "a": a}, dtype,
             expect_cl=layout in ("ndhwc", "strided_cl"))


@pytest.mark.parametrize("training", [True, False])
def test_bn_without_running_stats_uses_batch_statistics(training):
    x = _make_x(2, 3, (3, 5, 7), "ncdhw", F32)
    w, b, _ = _params(3, True, "relu")
    params = {"w": w, "b": b}
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y, dx, grads = _run(lambda x, w, b: norm_act.bn_act3d(x, w, b, None, None, training, 0.1, 1e-5, "relu"),
                        x, params, dy)
    # torch normalises with batch statistics whenever there are no running stats, even in eval mode.
    y_r, dx_r, grads_r = _run(lambda x, w, b: ref.bn_act3d(x, w, b, None, None, True, 0.1, 1e-5, "relu"),
                              x, params, dy)
    assert_close(y, y_r, *FP32_TOL["value"], what="y")
    assert_close(dx, dx_r, *FP32_TOL["value"], what="dx")
    for k in grads:
        assert_close(grads[k], grads_r[k], *FP32_TOL["param"], what=f"d{k}")


def test_bn_variance_is_stable_for_large_offsets():
    """CT-like values: mean 1000, std 1. Sums of squares in fp32 would lose the variance entirely."""
    C = 3
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(2, C, 5, 7, 9, generator=g, dtype=torch.float64) + 1000.0
    rm, rv = torch.zeros(C, device=DEVICE), torch.zeros(C, device=DEVICE)
    y = norm_act.bn_act3d(x64.float().to(DEVICE), None, None, rm, rv, True, 1.0, 1e-5, "none")
    xf = x64.float().double()  # the values the kernel sees
    var = xf.var(dim=(0, 2, 3, 4), unbiased=True)
    assert_close(rv.cpu(), var, atol=0, rtol=2e-5, what="running_var (unbiased)")
    assert_close(rm.cpu(), xf.mean(dim=(0, 2, 3, 4)), atol=0, rtol=1e-7, what="running_mean")
    y64 = torch.nn.functional.batch_norm(xf, None, None, training=True, eps=1e-5)
    assert_close(y.cpu(), y64, atol=1e-4, what="y")


def test_bn_running_stats_accumulate_over_steps():
    C = 17
    rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    rm_r, rv_r = rm.clone(), rv.clone()
    for step in range(3):
        x = _make_x(2, C, (3, 5, 7), "ndhwc", F32, seed=10 + step)
        norm_act.bn_act3d(x, None, None, rm, rv, True, 0.1, 1e-5, "relu")
        ref.bn_act3d(x, None, None, rm_r, rv_r, True, 0.1, 1e-5, "relu")
    assert_close(rm, rm_r, atol=1e-6, rtol=1e-5, what="running_mean")
    assert_close(rv, rv_r, atol=1e-6, rtol=1e-5, what="running_var")


def test_invalid_arguments():
    x = _make_x(2, 4, (3, 5, 7), "ncdhw", F32)
    with pytest.raises(ValueError, match="act must be"):
        norm_act.gn_act3d(x, 2, None, None, 1e-5, "gelu")
    with pytest.raises(ValueError, match="num_groups"):
        norm_act.gn_act3d(x, 3, None, None, 1e-5, "relu")
    with pytest.raises(ValueError, match="prelu"):
        norm_act.gn_act3d(x, 2, None, None, 1e-5, "prelu")
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        norm_act.bn_act3d(x, None, None, rm, rv, True, None, 1e-5, "relu")
    with pytest.raises(ValueError, match="more than 1 value"):
        norm_act.bn_act3d(x[:1, :, :1, :1, :1], None, None, rm, rv, True, 0.1, 1e-5, "relu")


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch with dynamic shapes."""
    C = 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, 2, 3, 4, generator=g).to(DEVICE).requires_grad_()
    w, b, a = (torch.rand(C, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    xcl = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    ops = torch.ops.pcrlv2
    cases = [
        (ops.bn_act3d_fwd.default, (x, w, b, rm, rv, a, True, 0.1, 1e-5, "prelu")),
        (ops.bn_act3d_fwd.default, (xcl, w, b, rm, rv, None, False, 0.1, 1e-5, "relu")),
        (ops.gn_act3d_fwd.default, (x, w, b, None, 2, 1e-5, "elu")),
        (ops.gn_act3d_fwd.default, (xcl, None, None, a, C, 1e-5, "prelu")),
        (ops.bn_act3d_bwd.default, (torch.randn_like(x), x.detach(), w.detach(), None, None, rm + 0.1, rv, True,
                                    "sigmoid", True)),
        (ops.gn_act3d_bwd.default, (torch.randn_like(x), x.detach(), None, None, None, rm.repeat(2), rv.repeat(2), C,
                                    "relu", False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_traces_without_graph_breaks():
    C = 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, 2, 3, 4, generator=g).to(DEVICE)
    w, b, a = (torch.rand(C, generator=g).to(DEVICE).requires_grad_() for _ in range(3))

    def f(x, rm, rv):
        y = norm_act.bn_act3d(x, w, b, rm, rv, True, 0.1, 1e-5, "prelu", a)
        return norm_act.gn_act3d(y, 2, w, b, 1e-5, "elu").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (f, compiled):
        xg = x.clone().requires_grad_()
        rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
        loss = fn(xg, rm, rv)
        results.append((loss, *torch.autograd.grad(loss, (xg, w, b, a)), rm, rv))
    for name, eager, comp in zip(("loss", "dx", "dw", "db", "da", "running_mean", "running_var"), *results):
        assert_close(comp, eager, atol=1e-6, rtol=1e-6, what=name)
