"""Fused PCRLv2 losses (kernels/restoration_loss.py, kernels/cosine_loss.py) against the plain-PyTorch
references (pcrlv2_fast/reference/fused_losses.py) and against the objective in pcrlv2_fast/losses/pcrlv2.py.

Shapes follow the model's ratios on odd sizes: target 12x20x28 with deep-supervision outputs at 3x5x7 (x4),
6x10x14 (x2) and 12x20x28 (x1). fp32 is compared element-wise with tight tolerances. For bf16/fp16 the
fp32 reference runs on the low-precision values upcast (exactly) to fp32; outputs and gradients are checked
element-wise against it with a dtype tolerance, and against losses/pcrlv2.py with the relative rule
err(fused, fp32 reference) <= 2 * err(eager same dtype, fp32 reference) + atol.
"""

import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pcrlv2_fast.losses import PCRLv2Loss
from tests import requirements
from tests.helpers import assert_close

requirements.importorskip("triton", "triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    requirements.skip("triton", "no CUDA and TRITON_INTERPRET is not set")

from pcrlv2_fast.kernels import cosine_loss as cl  # noqa: E402  (after the conftest chose the interpreter)
from pcrlv2_fast.kernels import restoration_loss as rl  # noqa: E402

from pcrlv2_fast.reference import fused_losses as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
B, FULL = 2, (12, 20, 28)
FACTORS = (4, 2, 1)
# Relative tolerances (of the largest reference magnitude): loss terms are float32 sums in every dtype;
# gradients are written in the input dtype: one ulp of bf16 (2^-7, the interpreter truncates) or fp16.
TERM_TOL = 1e-5
GRAD_TOL = {F32: 1e-5, BF16: 1e-2, F16: 1e-3}
# Relative rule: atol = LOW_ATOL * the largest reference magnitude, one ulp of the dtype there. The Triton
# interpreter truncates fp32 -> bf16 (a GPU rounds to nearest), so its bf16 gradients are off by <= 1 ulp.
LOW_ATOL = {BF16: 2.0**-8, F16: 2.0**-11}


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A leaf copy of ``t`` in the layout: 'ncdhw', 'ndhwc' (channels_last_3d) or 'strided' (every other
    element along W of a wider buffer: no unit stride at all)."""
    t = t.detach()
    if layout == "ndhwc":
        return t.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2].requires_grad_()
    return t.contiguous().requires_grad_()


def _volumes(dtype, layout="ncdhw", channels=1, seed=0, factors=FACTORS, logits=False):
    """(restored, low-resolution masks, target) like the model's outputs: values in [0, 1] (or logits)."""
    g = torch.Generator().manual_seed(seed)
    draw = (lambda *s: torch.randn(*s, generator=g) * 2) if logits else (lambda *s: torch.rand(*s, generator=g))
    target = torch.rand(B, channels, *FULL, generator=g).to(DEVICE)
    restored = _layout(draw(B, channels, *FULL).to(dtype).to(DEVICE), layout)
    masks = [_layout(draw(B, channels, *(s // f for s in FULL)).to(dtype).to(DEVICE), layout) for f in factors]
    return restored, masks, target


def _grads(out, upstream, inputs):
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True)


def _check_low_precision(fused, eager, exact, atol, what):
    """err(fused, fp32 reference) <= 2 * err(eager same dtype, fp32 reference) + atol (max norms)."""
    err_fused = (fused.double() - exact.double()).abs().max().item()
    err_eager = (eager.double() - exact.double()).abs().max().item()
    assert err_fused <= 2 * err_eager + atol, f"{what}: fused error {err_fused:.3g} > 2 x eager {err_eager:.3g}"


# ------------------------------------------------------------------------------------------- restoration


@pytest.mark.parametrize(
    "dtype, layout, channels",
    [(F32, "ncdhw", 1), (F32, "ndhwc", 2), (F32, "strided", 1), (BF16, "ncdhw", 1), (BF16, "ndhwc", 2),
     (F16, "strided", 1)],
)
def test_restoration_matches_reference(dtype, layout, channels):
    restored, masks, target = _volumes(dtype, layout, channels)
    weights = [0.7, 0.4, 1.3]
    upstream = torch.tensor([1.0, 0.6, 1.7, 0.9], device=DEVICE)
    out = rl.restoration_loss(restored, masks, target, weights)
    grads = _grads(out, upstream, [restored, *masks])
    # fp32 reference on the same values upcast, leaves of their own.
    exact_in = [t.detach().float().requires_grad_() for t in (restored, *masks)]
    exact = ref.restoration_loss_reference(exact_in[0], exact_in[1:], target, weights)
    exact_grads = _grads(exact, upstream, exact_in)
    assert_close(out, exact.detach(), atol=0, rtol=TERM_TOL, what="terms")
    for k, (g, e) in enumerate(zip(grads, exact_grads)):
        assert g.dtype == dtype and g.shape == e.shape, f"grad {k}: {g.dtype} {tuple(g.shape)}"
        assert_close(g, e, atol=GRAD_TOL[dtype] * e.abs().max().item(), what=f"grad {k} ({dtype}, {layout})")


@pytest.mark.parametrize("all_scales, dtype", [(False, F32), (True, F32), (True, BF16)])
def test_pcrlv2_terms_match_losses_module(all_scales, dtype):
    """restore / deep / global / local of PCRLv2Loss (masks upsampled like the model) and their gradients."""
    restored, low, gt = _volumes(dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    n_local, widths = 3, (10, 6, 3)

    def feats(rows):
        return [[(torch.randn(rows, c, generator=g)).to(dtype).to(DEVICE).requires_grad_(),
                 (torch.randn(rows, c, generator=g)).to(dtype).to(DEVICE).requires_grad_()] for c in widths]

    f1, f2, fl = feats(B), feats(B), feats(B * n_local)
    preds = [pair[1] for f in (f1, f2, fl) for pair in f]
    inputs = [restored, *low, *preds]
    loss = PCRLv2Loss(total_epochs=10, n_local=n_local, all_scales=all_scales)
    epoch, seed = 3.0, 11

    def eager(restored, low, f1, f2, fl):
        up = [F.interpolate(m, scale_factor=f, mode="trilinear") if f > 1 else m for m, f in zip(low, FACTORS)]
        return loss(restored, up, f1, f2, fl, gt, epoch, random.Random(seed))

    expected = eager(restored, low, f1, f2, fl)
    # The kernels' path: the same random draws, in PCRLv2Loss's order.
    rng = random.Random(seed)
    scale = -1 if all_scales else rng.randint(0, 2)
    local_scales = None if all_scales else [rng.randint(0, 2) for _ in range(2 * n_local)]
    assert scale == expected.scale
    restore, deep = rl.pcrlv2_restoration_losses(restored, low, gt, expected.beta, scale)
    glob, local = cl.pcrlv2_cosine_losses(f1, f2, fl, n_local, None if all_scales else scale, local_scales)
    fused = [restore, deep, glob, local]
    names = ["restore", "deep", "global", "local"]
    eager_terms = [expected.restore, expected.deep, expected.global_, expected.local]
    fused_grads = _grads(sum(fused), None, inputs)
    eager_grads = _grads(expected.total, None, inputs)
    if dtype == F32:
        for name, a, e in zip(names, fused, eager_terms):
            assert_close(a, e.detach(), atol=1e-7, rtol=TERM_TOL, what=name)
        for k, (a, e) in enumerate(zip(fused_grads, eager_grads)):
            if e is None:
                assert a is None or not a.any(), f"input {k}: the kernels give a gradient the objective has not"
                continue
            assert_close(a, e, atol=GRAD_TOL[dtype] * e.abs().max().item(), what=f"grad of input {k}")
        return
    # bf16: both against the fp32 objective on the upcast values.
    up_in = [t.detach().float().requires_grad_() for t in inputs]
    r32, low32, preds32 = up_in[0], up_in[1:4], up_in[4:]
    it = iter(preds32)
    f1_32, f2_32, fl_32 = ([[pair[0].detach().float(), next(it)] for pair in f] for f in (f1, f2, fl))
    exact = eager(r32, low32, f1_32, f2_32, fl_32)
    exact_terms = [exact.restore, exact.deep, exact.global_, exact.local]
    exact_grads = _grads(exact.total, None, up_in)
    for name, a, e, x in zip(names, fused, eager_terms, exact_terms):
        _check_low_precision(a.detach(), e.detach(), x.detach(), 1e-7, name)
    for k, (a, e, x) in enumerate(zip(fused_grads, eager_grads, exact_grads)):
        if x is not None:
            _check_low_precision(a, e, x, LOW_ATOL[dtype] * x.abs().max().item(), f"grad of input {k}")


def test_restoration_from_logits_and_mixed_factors():
    """Sigmoid fused (full resolution) or applied first (low resolution); per-dimension factors (2, 4, 1)
    and (1, 1, 1); C = 3."""
    factors = [(2, 4, 1), (1, 1, 1)]
    g = torch.Generator().manual_seed(5)
    target = torch.rand(B, 3, *FULL, generator=g).to(DEVICE)
    restored = (torch.randn(B, 3, *FULL, generator=g) * 2).to(DEVICE).requires_grad_()
    masks = [(torch.randn(B, 3, *(s // f for s, f in zip(FULL, fs)), generator=g) * 2).to(DEVICE).requires_grad_()
             for fs in factors]
    upstream = torch.tensor([0.5, 1.5, 2.0], device=DEVICE)
    for from_logits in (True, False):
        out = rl.restoration_loss(restored, masks, target, [0.25, 1.0], from_logits=from_logits)
        grads = _grads(out, upstream, [restored, *masks])
        exact = ref.restoration_loss_reference(restored, masks, target, [0.25, 1.0], from_logits=from_logits)
        exact_grads = _grads(exact, upstream, [restored, *masks])
        assert_close(out, exact.detach(), atol=0, rtol=TERM_TOL, what=f"terms (from_logits={from_logits})")
        for k, (a, e) in enumerate(zip(grads, exact_grads)):
            assert_close(a, e, atol=GRAD_TOL[F32] * e.abs().max().item(), what=f"grad {k} ({from_logits})")


def test_restoration_known_values_and_errors():
    target = torch.full((1, 1, 8, 4, 4), 0.25, device=DEVICE)
    restored = torch.full_like(target, 0.75)
    masks = [torch.full((1, 1, 2, 1, 1), 0.5, device=DEVICE), target.clone()]
    out = rl.restoration_loss(restored, masks, target, [2.0, 1.0])
    assert_close(out, torch.tensor([0.25, 2 * 0.0625, 0.0], device=DEVICE), atol=1e-7, what="constant volumes")
    assert rl.restoration_loss(restored, [], target).shape == (1,)
    with pytest.raises(ValueError, match="divide"):
        rl.restoration_loss(restored, [torch.zeros(1, 1, 3, 4, 4, device=DEVICE)], target)
    with pytest.raises(ValueError, match="powers of two"):
        rl.restoration_loss(torch.zeros(1, 1, 6, 4, 4, device=DEVICE), [torch.zeros(1, 1, 2, 4, 4, device=DEVICE)],
                            torch.zeros(1, 1, 6, 4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="target"):
        rl.restoration_loss(restored, [], target.clone().requires_grad_())


# ------------------------------------------------------------------------------------------------ cosine


def _cosine_case(dtype, seed=0):
    """Three prediction tensors (widths 24, 24, 5) with B=5 rows per view (blocks of 4 under the interpreter):
    shared views, a view used by two slots, unused rows (zero gradient) and a transposed (non-contiguous)
    projection."""
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)
    preds = [make(5, 24).requires_grad_(), make(15, 24).requires_grad_(), make(5, 5).requires_grad_()]
    projs = [make(5, 24), make(24, 10).t(), make(5, 5)]
    T = ref.CosineTerm
    terms = [T(0, 0, 1, 5, 5, -0.5, 0), T(1, 5, 0, 0, 5, -0.5, 0),  # a symmetric pair, slot 0
             T(0, 0, 1, 0, 5, 0.25, 1), T(1, 0, 0, 0, 5, 2.0, 1),  # pred 0 again, slot 1; rows 10..14 unused
             T(2, 1, 2, 0, 3, 1.5, 2), T(2, 1, 2, 2, 3, -1.0, 2)]  # a sub-range, rows 0 and 4 unused
    return preds, projs, terms


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_cosine_matches_reference(dtype):
    preds, projs, terms = _cosine_case(dtype)
    upstream = torch.tensor([1.0, -0.7, 2.5], device=DEVICE)
    out = cl.cosine_pair_loss(preds, projs, terms, 3)
    grads = _grads(out, upstream, preds)
    exact_in = [p.detach().float().requires_grad_() for p in preds]
    exact = ref.cosine_pair_loss_reference(exact_in, [q.float() for q in projs], terms, 3)
    exact_grads = _grads(exact, upstream, exact_in)
    assert_close(out, exact.detach(), atol=1e-6, rtol=TERM_TOL, what="slots")
    for k, (a, e) in enumerate(zip(grads, exact_grads)):
        assert a.dtype == dtype
        assert_close(a, e, atol=GRAD_TOL[dtype] * e.abs().max().item(), what=f"grad of pred {k} ({dtype})")
    assert not grads[1][10:].any() and not grads[2][0].any() and not grads[2][4].any()


def test_cosine_eps_and_zero_rows():
    """Norms below eps and exact zeros follow F.cosine_similarity: clamped norm, undifferentiated clamp."""
    pred = torch.tensor([[1e-9, 2e-9, 0.0], [0.0, 0.0, 0.0], [3.0, -1.0, 2.0], [1e-5, 0.0, 1e-5]], device=DEVICE)
    proj = torch.tensor([[0.3, 0.5, 0.1], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 1.0, 0.0]], device=DEVICE)
    terms = [ref.CosineTerm(0, 0, 0, 0, 4, 1.0, 0)]
    a = pred.clone().requires_grad_()
    out = cl.cosine_pair_loss([a], [proj], terms, 1)
    (grad,) = torch.autograd.grad(out.sum(), [a])
    e = pred.double().requires_grad_()
    exact = ref.cosine_pair_loss_reference([e], [proj.double()], terms, 1)
    (exact_grad,) = torch.autograd.grad(exact.sum(), [e])
    assert_close(out, exact.detach(), atol=1e-6, what="eps value")
    assert_close(grad, exact_grad, atol=1e-6, rtol=1e-5, what="eps grad")


def test_cosine_properties_and_errors():
    g = torch.Generator().manual_seed(7)
    a, b = (torch.randn(6, 9, generator=g).to(DEVICE) for _ in range(2))
    pair = lambda x, y: cl.cosine_pair_loss([x, y], [x, y], cl.pair_terms(0, 0, 0, 1, 1, 0, 6, 1.0, 0), 1)
    assert_close(pair(a, b), pair(b, a), atol=1e-7, what="symmetry")
    assert_close(pair(a, a), torch.tensor([-1.0], device=DEVICE), atol=1e-6, what="identical views")
    assert_close(pair(a, -3 * a), torch.tensor([1.0], device=DEVICE), atol=1e-6, what="opposite views")
    T = ref.CosineTerm
    with pytest.raises(ValueError, match="overlap"):
        cl.cosine_pair_loss([a], [b], [T(0, 0, 0, 0, 4, 1.0, 0), T(0, 2, 0, 0, 4, 1.0, 0)], 1)
    with pytest.raises(ValueError, match="width"):
        cl.cosine_pair_loss([a], [b[:, :5]], [T(0, 0, 0, 0, 4, 1.0, 0)], 1)
    with pytest.raises(ValueError, match="slot"):
        cl.cosine_pair_loss([a], [b], [T(0, 0, 0, 0, 4, 1.0, 3)], 2)


# ----------------------------------------------------------------------------------- torch.library / compile


def test_ops_trace_without_graph_breaks():
    target = torch.rand(1, 1, 4, 4, 8, device=DEVICE)
    restored = torch.rand_like(target).requires_grad_()
    masks = [torch.rand(1, 1, 2, 2, 4, device=DEVICE).requires_grad_(), torch.rand_like(target).requires_grad_()]
    torch.library.opcheck(torch.ops.pcrlv2.restoration_loss.default, (restored, masks, target, [0.5, 0.25], False))
    preds, projs, terms = _cosine_case(F32)
    used_p, used_q, table, n_blocks, block_r, block_c = cl._tables(preds, projs, [ref.CosineTerm(*t) for t in terms], 3)
    packed = torch.cat([preds[u].detach().reshape(-1) for u in used_p]).requires_grad_()
    packed_proj = torch.cat([projs[v].reshape(-1) for v in used_q])
    blocks, term_table = table[: n_blocks * 6].view(n_blocks, 6), table[n_blocks * 6:].view(-1, 3)
    torch.library.opcheck(torch.ops.pcrlv2.cosine_pair_loss.default,
                          (packed, packed_proj, blocks, term_table, 3, 1e-8, block_r, block_c))

    def step(restored, m0, m1, p0, p1, p2):
        terms_r = rl.restoration_loss(restored, [m0, m1], target, [0.5, 0.25])
        terms_c = cl.cosine_pair_loss([p0, p1, p2], projs, terms, 3)
        return terms_r.sum() + terms_c.sum()

    args = (restored, *masks, *preds)
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    got = compiled(*args)
    want = step(*args)
    assert_close(got.detach(), want.detach(), atol=1e-6, what="compiled step")
    for a, e in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        assert_close(a, e, atol=1e-7, what="compiled grads")


def test_kernels_not_imported_with_the_package():
    code = "import sys, pcrlv2_fast; print(any(m.startswith('pcrlv2_fast.kernels') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
