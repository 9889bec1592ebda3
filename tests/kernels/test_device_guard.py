"""Every Triton launcher enters its tensors' device guard: Triton launches on the current CUDA device, so a run on
``--device cuda:1`` (single process, current device 0) needs it. Checked on CPU by recording the guard's calls."""

import random

import pytest
import torch

from tests import requirements

requirements.importorskip("triton", "triton")

from pcrlv2_fast.kernels import common, conv3d_block, cosine_loss, norm_act, restoration_loss  # noqa: E402

from pcrlv2_fast.losses import PCRLv2Loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODULES = (norm_act, conv3d_block, cosine_loss, restoration_loss)


@pytest.fixture
def guarded(monkeypatch):
    """The devices whose guard was entered, per call."""
    entered = []

    def recording_guard(t):
        entered.append(t.device)
        return common.device_guard(t)

    for module in MODULES:
        assert module.device_guard is common.device_guard  # one definition
        monkeypatch.setattr(module, "device_guard", recording_guard)
    return entered


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_()


def test_norm_act_launches_are_guarded(guarded):
    x = _x(2, 4, 3, 4, 5)
    w, b = torch.ones(4, device=DEVICE, requires_grad=True), torch.zeros(4, device=DEVICE, requires_grad=True)
    norm_act.bn_act3d(x, w, b, None, None, True, 0.1, 1e-5, "relu").sum().backward()
    n_bn = len(guarded)
    norm_act.gn_act3d(x, 2, w, b, 1e-5, "relu").sum().backward()
    assert n_bn >= 2 and len(guarded) >= n_bn + 2  # forward and backward of each
    assert set(guarded) == {x.device}


def test_conv_block_launches_are_guarded(guarded):
    x = _x(2, 3, 3, 4, 5)
    w = (torch.randn(4, 3, 3, 3, 3) * 0.2).to(DEVICE).requires_grad_()
    y, mean, var = conv3d_block.conv3d_bn_stats(x, w, None, impl="triton")
    (y.sum() + mean.sum() + var.sum()).backward()
    assert len(guarded) >= 2 and set(guarded) == {x.device}


def test_loss_launches_are_guarded(guarded):
    def feats(rows):
        return [[_x(rows, c), _x(rows, c)] for c in (8, 4, 2)]

    f1, f2, fl = feats(2), feats(2), feats(12)
    gt = torch.rand(2, 1, 8, 8, 8, device=DEVICE)
    restoration = _x(2, 1, 8, 8, 8)
    masks = [_x(2, 1, 2, 2, 2), _x(2, 1, 4, 4, 4), _x(2, 1, 8, 8, 8)]
    terms = PCRLv2Loss(total_epochs=2, kernels="triton")(restoration, masks, f1, f2, fl, gt, 0, random.Random(0))
    terms.total.backward()
    assert len(guarded) == 4 and set(guarded) == {gt.device}  # both losses, forward and backward
