"""The fused surfaces (pcrlv2_fast.nn, NonSkipUNet3D(kernels=...), PCRLv2Loss(kernels=...), the selftest)
against the plain PyTorch path, under the Triton interpreter on CPU (real kernels on CUDA).

The conv block's BatchNorm path is checked both ways: with ``conv3d_bn_stats`` (the installed one, or a torch
stand-in with its API when pcrlv2_fast.kernels.conv3d_block is absent) and with plain F.conv3d before the fused
norm. Tolerances are fp32: 1e-5 relative for outputs and gradients (sums in another order than torch's),
except where stated.
"""

import argparse
import copy
import logging
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests import requirements
from tests.helpers import assert_close

requirements.importorskip("triton", "triton")

import pcrlv2_fast.nn.functional as fused_fn  # noqa: E402  (after the conftest chose the interpreter)
from pcrlv2_fast import selftest  # noqa: E402
from pcrlv2_fast.checkpoint import load_pretrained, save_checkpoint  # noqa: E402
from pcrlv2_fast.losses import PCRLv2Loss  # noqa: E402
from pcrlv2_fast.models import LUConv, NonSkipUNet3D  # noqa: E402
from pcrlv2_fast.nn import FusedConvBlock3d, FusedNormAct3d, FusedSequential, fuse_model  # noqa: E402
from pcrlv2_fast.reference import ReferencePCRLv23d  # noqa: E402
from pcrlv2_fast.reference.fused_losses import upsample_mask  # noqa: E402
from pcrlv2_fast.train.step import StepEngine, pretrain_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 1e-5
TERM_KEYS = ("loss_global", "loss_local", "loss_restore", "loss_deep")


def _close(actual, expected, what, rtol=RTOL):
    """Relative to the larger of 1 and the reference's largest magnitude (gradients that are 0 in exact
    arithmetic, such as a conv bias before a training BatchNorm, are rounding noise on both sides)."""
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    assert_close(actual.detach().float().cpu(), expected.detach().float().cpu(), atol=rtol * scale, rtol=10 * rtol,
                 what=what)


def _torch_conv3d_bn_stats(x, weight, bias=None, impl="auto"):
    """conv3d_bn_stats's API in plain torch: stands in when pcrlv2_fast.kernels.conv3d_block is not installed."""
    y = F.conv3d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=1)
    y = y.contiguous(memory_format=torch.channels_last_3d)
    var, mean = torch.var_mean(y.float(), dim=(0, 2, 3, 4), correction=0)
    return y, mean, var


@pytest.fixture(params=["conv_stats", "plain_conv"])
def conv_path(request, monkeypatch):
    """Run the fused conv block with conv3d_bn_stats (installed or the stand-in) or with F.conv3d."""
    if request.param == "conv_stats":
        monkeypatch.setattr(fused_fn, "_conv_bn_stats", fused_fn.conv_bn_stats_fn() or _torch_conv3d_bn_stats)
    else:
        monkeypatch.setattr(fused_fn, "_conv_bn_stats", None)
    return request.param


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def _compare_modules(fused, ref, x, steps=2):
    """Forward/backward ``steps`` times on the same input; outputs, input grads, parameter grads and buffers."""
    dy = torch.randn(ref(x.detach().clone()).shape, generator=torch.Generator().manual_seed(3)).to(x.device)
    ref.load_state_dict(fused.state_dict())  # the probe forward above moved ref's running stats
    for step in range(steps):
        xs = [x.detach().clone().requires_grad_() for _ in range(2)]
        ys = [m(xi) for m, xi in zip((fused, ref), xs)]
        _close(ys[0], ys[1], f"step {step}: output")
        for y in ys:
            y.backward(dy)
        _close(xs[0].grad, xs[1].grad, f"step {step}: input grad")
        gf, gr = _grads(fused), _grads(ref)
        assert gf.keys() == gr.keys()
        for name in gr:
            _close(gf[name], gr[name], f"step {step}: grad of {name}")
        for m in (fused, ref):
            m.zero_grad(set_to_none=True)
    for (name, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers(), strict=True):
        _close(a, b, f"buffer {name}")


# ------------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("norm,act,train,layout", [
    ("bn", "relu", True, "ncdhw"),
    ("bn", "prelu", True, "ndhwc"),
    ("bn", "elu", False, "ncdhw"),
    ("bn", "sigmoid", True, "ncdhw"),  # the deep-supervision head
    ("gn", "elu", True, "ndhwc"),
    ("in", "relu", True, "ncdhw"),
])
def test_fused_conv_block_matches_torch_block(norm, act, train, layout, conv_path):
    torch.manual_seed(0)
    ref = LUConv(3, 5, act, norm).to(DEVICE)
    torch.manual_seed(0)
    fused = FusedConvBlock3d(3, 5, act, norm).to(DEVICE)
    assert list(fused.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), f"same initialisation: {k}"
    if norm == "bn":  # non-trivial running statistics for eval, momentum update for training
        for bn in (fused.bn1, ref.bn1):
            bn.running_mean.fill_(0.3)
            bn.running_var.fill_(2.0)
    fused.train(train)
    ref.train(train)
    x = torch.randn(2, 3, 3, 5, 7, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 2 + 0.5
    if layout == "ndhwc":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    _compare_modules(fused, ref, x)


def test_conv_block_cumulative_momentum_and_no_running_stats(conv_path):
    """BatchNorm bookkeeping: momentum=None (cumulative average) and track_running_stats=False."""
    for kwargs in ({"momentum": None}, {"track_running_stats": False}):
        torch.manual_seed(0)
        conv, bn = nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4, **kwargs)
        ref = LUConv(2, 4)
        ref.conv1, ref.bn1 = copy.deepcopy(conv), copy.deepcopy(bn)
        fused = FusedConvBlock3d.from_modules(conv, bn, nn.ReLU())
        x = torch.randn(3, 2, 3, 4, 5, generator=torch.Generator().manual_seed(2))
        _compare_modules(fused.to(DEVICE), ref.to(DEVICE), x.to(DEVICE), steps=3)


@pytest.mark.parametrize("norm,act", [("bn", "relu"), ("gn", "prelu"), ("in", "elu")])
def test_fused_norm_act(norm, act):
    torch.manual_seed(0)
    fused = FusedNormAct3d(6, norm, act).to(DEVICE)
    ref = nn.Sequential(copy.deepcopy(fused.norm), copy.deepcopy(fused.activation)).to(DEVICE)
    with torch.no_grad():  # non-trivial affine parameters
        for m in (fused.norm, ref[0]):
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
            m.bias.copy_(torch.linspace(-0.3, 0.3, 6))
    x = torch.randn(2, 6, 3, 4, 5, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    sd = fused.state_dict()
    assert [k.split(".", 1)[1] for k in sd] == [k.split(".", 1)[1] for k in ref.state_dict()]
    _compare_modules(fused, _Renamed(ref), x)
    fused.eval()
    ref.eval()
    with torch.no_grad():
        _close(fused(x), ref(x), "eval output")


class _Renamed(nn.Module):
    """ref Sequential(norm, act) exposed as children ``norm`` / ``activation``, to compare names one to one."""

    def __init__(self, seq):
        super().__init__()
        self.norm, self.activation = seq[0], seq[1]

    def forward(self, x):
        return self.activation(self.norm(x))


def test_torch_kernels_is_the_plain_path_and_fallback_is_logged(monkeypatch, caplog):
    torch.manual_seed(0)
    block = FusedConvBlock3d(2, 3, "relu", "bn", kernels="torch")
    ref = copy.deepcopy(block)
    ref.__class__ = LUConv
    x = torch.randn(2, 2, 3, 4, 5)
    assert torch.equal(block(x), ref(x))
    # kernels="triton" on CPU tensors without the interpreter: the torch path runs, and says so once.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr("pcrlv2_fast.nn.dispatch._logged", set())
    block.set_kernels("triton")
    with caplog.at_level(logging.WARNING, logger="pcrlv2_fast.nn"):
        block(x)
        y = block(x)
    assert torch.equal(y, ref(x))
    assert sum("running the torch path" in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match="kernels"):
        FusedConvBlock3d(2, 3, kernels="cuda")
    with pytest.raises(ValueError, match="kernels"):
        NonSkipUNet3D(width=2, kernels="fast")
    with pytest.raises(ValueError, match="kernels"):
        PCRLv2Loss(10, kernels="fast")


# ------------------------------------------------------------------------------------------ fuse_model
def test_fuse_model_on_the_model():
    torch.manual_seed(0)
    ref = NonSkipUNet3D(width=2).to(DEVICE)
    model = copy.deepcopy(ref)
    report = fuse_model(model)
    assert report.counts() == {"conv_block": 17} and not report.skipped
    assert "down_tr64.ops.0" in report.table()
    assert all(type(m) is not LUConv for m in model.modules())
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.rand(2, 1, 16, 8, 8, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    model.eval()
    ref.eval()
    with torch.no_grad():
        (r, feats, masks), (r0, feats0, masks0) = model(x), ref(x)
    _close(r, r0, "restoration")
    for (p, q), (p0, q0) in zip(feats, feats0):
        _close(p, p0, "proj")
        _close(q, q0, "pred")
    for m, m0 in zip(masks, masks0):
        _close(m, m0, "mask")
    # Idempotent, and kernels="torch" switches every block back to the plain path.
    assert fuse_model(model, "torch").counts() == {"conv_block": 17}
    assert all(m.kernels == "torch" for m in model.modules() if isinstance(m, FusedConvBlock3d))


class _UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(inplace=True),
            nn.Conv3d(4, 4, 3, padding=1, bias=False), nn.GroupNorm(2, 4), nn.PReLU(4),
            nn.MaxPool3d(2),
        )
        self.body = nn.Sequential(
            nn.Sequential(nn.Conv3d(4, 6, 1), nn.InstanceNorm3d(6, affine=True), nn.ELU()),
            nn.BatchNorm3d(6), nn.Sigmoid(),
            nn.Conv3d(6, 6, 3, padding=1), nn.BatchNorm3d(6), nn.LeakyReLU(0.1),
        )
        self.head = nn.Conv3d(6, 1, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_fuse_model_on_user_sequentials(conv_path):
    torch.manual_seed(0)
    ref = _UserNet().to(DEVICE)
    net = copy.deepcopy(ref)
    keys = list(net.state_dict())
    report = fuse_model(net)
    kinds = sorted((b.path, b.kind, b.norm, b.act) for b in report.fused)
    assert kinds == [("body", "norm_act", "bn", "sigmoid"), ("body.0", "conv_norm_act", "in", "elu"),
                     ("stem", "conv_norm_act", "bn", "relu"), ("stem", "conv_norm_act", "gn", "prelu")]
    assert [p for p, _ in report.skipped] == ["body.4"] and "LeakyReLU" in report.skipped[0][1]
    assert type(net.stem) is FusedSequential and type(net.body[0]) is FusedSequential
    assert list(net.state_dict()) == keys
    net.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 1, 6, 4, 8, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    _compare_modules(net, ref, x)
    ref.load_state_dict(net.state_dict(), strict=True)  # and back


def test_fuse_model_converts_a_root_sequential_in_place():
    seq = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.GroupNorm(3, 3), nn.ReLU())
    ref = copy.deepcopy(seq)
    report = fuse_model(seq)
    assert type(seq) is FusedSequential and len(report) == 1
    x = torch.randn(1, 1, 4, 4, 4).to(DEVICE)
    _close(seq.to(DEVICE)(x), ref.to(DEVICE)(x), "root sequential")


# ----------------------------------------------------------------------------------------- checkpoints
def test_official_checkpoint_round_trip_through_a_fused_model(tmp_path):
    torch.manual_seed(0)
    official = ReferencePCRLv23d(base=2)
    for m in official.modules():  # trained-looking running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "official.pt"
    torch.save({"state_dict": official.state_dict(), "optimizer": None, "epoch": 3}, path)

    fused = load_pretrained(path, model=NonSkipUNet3D(width=2, kernels="triton"))
    plain = load_pretrained(path)
    sd_f, sd_p = fused.state_dict(), plain.state_dict()
    assert list(sd_f) == list(sd_p) == list(official.state_dict()) and len(sd_f) == 169
    assert all(torch.equal(sd_f[k], sd_p[k]) for k in sd_p)

    x = torch.rand(2, 1, 8, 8, 16, generator=torch.Generator().manual_seed(7))
    for m in (fused, official):
        m.eval()
    with torch.no_grad():
        r, feats, masks = fused.to(DEVICE)(x.to(DEVICE))
        r0, feats0, masks0 = official(x)
    _close(r, r0, "restoration")
    for (p, q), (p0, q0) in zip(feats, feats0):
        _close(p, p0, "proj")
        _close(q, q0, "pred")
    for m, m0 in zip(masks, masks0):
        _close(m, m0, "mask")

    back = save_checkpoint(tmp_path / "fused.pt", fused.cpu())
    again = ReferencePCRLv23d(base=2)
    again.load_state_dict(torch.load(back, weights_only=True)["state_dict"], strict=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in official.state_dict().items())


def test_low_resolution_masks_option():
    torch.manual_seed(0)
    model = NonSkipUNet3D(width=2).eval()
    x = torch.rand(2, 1, 16, 8, 8)
    with torch.no_grad():
        _, _, up = model(x)
        _, _, low = model(x, upsample_masks=False)
        model.upsample_masks = False
        _, _, low2 = model(x)
        _, _, up2 = model(x, upsample_masks=True)
    assert [tuple(m.shape[2:]) for m in low] == [(4, 2, 2), (8, 4, 4), (16, 8, 8)]
    for a, b, c, d in zip(up, low, low2, up2):
        assert torch.equal(upsample_mask(b, x.shape[2:]), a) and torch.equal(b, c) and torch.equal(a, d)
    assert model(x, local=True)[2] == []


# -------------------------------------------------------------------------------------------- the loss
def _loss_inputs(B, n_local, full=(16, 8, 8), widths=(16, 8, 4), low=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_()  # noqa: E731
    feats1 = [[leaf(B, c), leaf(B, c)] for c in widths]
    feats2 = [[leaf(B, c), leaf(B, c)] for c in widths]
    local = [[leaf(n_local * B, c), leaf(n_local * B, c)] for c in widths]
    restoration = torch.rand(B, 1, *full, generator=g).to(DEVICE).requires_grad_()
    masks = [torch.rand(B, 1, *(s // f for s in full), generator=g).to(DEVICE).requires_grad_() for f in (4, 2, 1)]
    gt = torch.rand(B, 1, *full, generator=g).to(DEVICE)
    if not low:
        masks = [upsample_mask(m, full).detach().requires_grad_() for m in masks]
    return restoration, masks, feats1, feats2, local, gt


@pytest.mark.parametrize("all_scales,low,with_local", [(False, True, True), (True, True, True), (False, False, True),
                                                       (False, True, False)])
def test_pcrlv2_loss_triton_equals_torch(all_scales, low, with_local):
    n_local = 6
    inputs = _loss_inputs(3, n_local, low=low)
    restoration, masks, feats1, feats2, local, gt = inputs
    leaves = [restoration, *masks] + [t for f in (feats1, feats2, local) for pair in f for t in pair]
    results = []
    for kernels in ("torch", "triton"):
        rng = random.Random(11)
        loss = PCRLv2Loss(total_epochs=10, n_local=n_local, all_scales=all_scales, kernels=kernels)
        terms = loss(restoration, masks, feats1, feats2, local if with_local else None, gt, 4, rng)
        grads = torch.autograd.grad(terms.total, leaves, allow_unused=True)
        results.append((terms, grads, rng.random()))
    (t0, g0, r0), (t1, g1, r1) = results
    assert r0 == r1, "the scale draws consume the generator identically"
    assert (t0.scale, t0.beta) == (t1.scale, t1.beta)
    for name in ("total", "global_", "local", "restore", "deep"):
        _close(getattr(t1, name), getattr(t0, name), name)
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert (a is None) == (b is None), f"grad {i}"
        if b is not None:
            _close(a, b, f"grad {i}")


# ---------------------------------------------------------------------------------------- a few steps
def _views(g, n, spatial):
    """Views whose samples differ in intensity offset and contrast, as real crops do: with identical noise
    statistics the batch-normalised projections of a tiny network are dominated by rounding."""
    shift = torch.linspace(-1.5, 1.5, n)[torch.randperm(n, generator=g)].view(n, 1, 1, 1, 1)
    scale = torch.rand(n, 1, 1, 1, 1, generator=g) + 0.5
    return (torch.randn(n, 1, *spatial, generator=g) * scale + shift).to(DEVICE)


@pytest.mark.parametrize("conv_impl", ["auto", "triton"])
def test_tiny_model_training_curves_match(conv_impl):
    """Width 1, batch 4, one local view, 8^3 views, 3 SGD steps: the loss terms of every step and the first step's
    gradients agree. ``conv_impl="triton"`` forces the implicit-GEMM conv kernel (and its data/weight gradient
    kernels) into every fused block; on CPU ``auto`` runs torch's convolution. The forced conv runs 2 steps: the
    interpreter takes ~30 s per step there.

    Tolerances (measured on the interpreter, with and without conv3d_bn_stats: gradients 3.5e-5, first-step terms
    3e-7, curve 5e-5): tiny networks are ill-conditioned (a 1e-6 relative change of the weights moves some
    gradients by 1e-3), so rounding differences grow from step to step. Gradients: 5e-4 relative to
    max(1, |grad|); first-step terms 1e-5; curve 1e-3.
    """
    curves, first_grads = {}, {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        model = NonSkipUNet3D(width=1, kernels=kernels, upsample_masks=kernels == "torch").to(DEVICE)
        blocks = [m for m in model.modules() if isinstance(m, FusedConvBlock3d)]
        assert len(blocks) == (0 if kernels == "torch" else 17)  # 8 encoder, 6 decoder, 3 heads
        for block in blocks:
            block.set_kernels(kernels, conv_impl)
        loss_fn = PCRLv2Loss(total_epochs=10, n_local=1, kernels=kernels)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        engine = StepEngine.build(model, loss_fn, opt)
        g = torch.Generator().manual_seed(1)
        curve = []
        for step in range(3 if conv_impl == "auto" else 2):
            x1, x2, loc = _views(g, 4, (8, 8, 8)), _views(g, 4, (8, 8, 8)), _views(g, 4, (8, 8, 8))
            gt = torch.rand(4, 1, 8, 8, 8, generator=g).to(DEVICE)
            out = pretrain_step(engine, [(x1, x2, gt, loc)], 0, random.Random(step))
            assert not out.skipped
            curve.append(torch.tensor([out.terms[k] for k in TERM_KEYS]))
            if step == 0:
                first_grads[kernels] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        curves[kernels] = torch.stack(curve)
    assert first_grads["triton"].keys() == first_grads["torch"].keys()
    for name, grad in first_grads["torch"].items():
        _close(first_grads["triton"][name], grad, f"step 0 grad of {name}", rtol=5e-4)
    assert_close(curves["triton"][0], curves["torch"][0], atol=1e-5, what="step 0 terms")
    assert_close(curves["triton"], curves["torch"], atol=1e-3, what="loss curve")


# -------------------------------------------------------------------------------------------- selftest
def test_selftest_passes_and_prints_the_table(capsys):
    assert selftest.main([]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1]
    for column in selftest.COLUMNS:
        assert column in header
    for op in ("bn_act3d", "gn_act3d", "restoration_loss", "cosine_pair_loss", "conv3d_bn_stats"):
        assert out.count(op) >= 1, op
    assert "all checks passed" in out


def test_selftest_tf32_policy_is_explicit(monkeypatch, capsys):
    seen = []
    real = selftest._run_checks

    def recording(device):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return [r for r in real(device) if r["op"] == "bn_act3d"]

    monkeypatch.setattr(selftest, "_run_checks", recording)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    strict = selftest.run_selftest("cpu")
    relaxed = selftest.run_selftest("cpu", tf32=True)
    assert seen == [(False, False), (True, True)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    fp32 = [r for r in strict if r["dtype"] == "float32"][0]
    fp32_tf32 = [r for r in relaxed if r["dtype"] == "float32"][0]
    assert fp32["tol"] == selftest.FP32_TOL and fp32_tf32["tol"] == selftest.TF32_TOL and "TF32" in fp32_tf32["note"]
    low = [[r["tol"] for r in rows if r["dtype"] != "float32"] for rows in (strict, relaxed)]
    assert low[0] == low[1]
    assert selftest.main(["--tf32"]) == 0 and "TF32 on" in capsys.readouterr().out


def test_selftest_subcommand_registration():
    parser = argparse.ArgumentParser(prog="pcrlv2-fast")
    sub = parser.add_subparsers(dest="command", required=True)
    selftest.add_selftest_parser(sub)
    args = parser.parse_args(["selftest", "--device", "cpu", "--json"])
    assert args.command == "selftest" and args.device == "cpu" and args.json and callable(args.func)


def test_fused_block_counts_say_what_runs_fused(monkeypatch):
    from pcrlv2_fast.nn import fused_block_counts

    model = NonSkipUNet3D(width=1, kernels="triton")
    assert fused_block_counts(model, DEVICE) == {"conv": "17/17", "norm_act": "17/17"}
    assert fused_block_counts(NonSkipUNet3D(width=1), DEVICE) == {"conv": "0/17", "norm_act": "0/17"}
    # SyncBatchNorm (several processes): the conv blocks merge their statistics over the processes, still fused.
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert fused_block_counts(synced, DEVICE) == {"conv": "17/17", "norm_act": "17/17"}
    gn = NonSkipUNet3D(width=1, norm="gn", kernels="triton")
    assert fused_block_counts(gn, DEVICE) == {"conv": "0/17", "norm_act": "17/17"}
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # plain CPU tensors: the torch path runs
        assert fused_block_counts(model, "cpu") == {"conv": "0/17", "norm_act": "0/17"}
