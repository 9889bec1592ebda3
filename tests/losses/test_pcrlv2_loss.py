import math
import random

import pytest
import torch
import torch.nn.functional as F

from pcrlv2_fast.losses import PCRLv2Loss, beta_schedule, pair_loss, pair_loss_all_scales, split_views
from pcrlv2_fast.models import NonSkipUNet3D
from pcrlv2_fast.reference import ReferencePCRLv23d, reference_step_loss

# Expectations below are written from DESIGN.md's formulas with plain tensor arithmetic, not with the module's own
# helpers: cos(a, b) over the feature dimension, pair(o1, o2, i) = -0.5 (mean cos(pred1_i, proj2_i) +
# mean cos(pred2_i, proj1_i)), local views batched view-major (rows j*B:(j+1)*B are view j).


def cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def formula_pair(feats_a, feats_b, scale: int) -> torch.Tensor:
    proj_a, pred_a = feats_a[scale]
    proj_b, pred_b = feats_b[scale]
    return -0.5 * (cos_rows(pred_a, proj_b).mean() + cos_rows(pred_b, proj_a).mean())


def formula_pair_all_scales(feats_a, feats_b) -> torch.Tensor:
    return sum(formula_pair(feats_a, feats_b, s) for s in range(len(feats_a))) / len(feats_a)


def feats_from(pairs):
    return [[torch.tensor(proj, dtype=torch.float32), torch.tensor(pred, dtype=torch.float32)] for proj, pred in pairs]


def test_pair_loss_hand_computed():
    # view a: proj (1, 0), pred (1, 1); view b: proj (0, 1), pred (1, 0), batch of one.
    a = feats_from([([[1.0, 0.0]], [[1.0, 1.0]])])
    b = feats_from([([[0.0, 1.0]], [[1.0, 0.0]])])
    # cos(pred_a, proj_b) = 1/sqrt(2); cos(pred_b, proj_a) = 1
    expected = -0.5 * (1 / math.sqrt(2) + 1.0)
    assert pair_loss(a, b, 0).item() == pytest.approx(expected, abs=1e-6)


def test_pair_loss_batch_mean_and_known_values():
    proj = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pred = torch.tensor([[-3.0, 0.0], [0.0, 5.0]])  # cos with proj: -1 and +1 -> mean 0
    a = [[proj, pred]]
    assert pair_loss(a, a, 0).item() == pytest.approx(0.0, abs=1e-7)
    same = [[proj, proj]]
    assert pair_loss(same, same, 0).item() == pytest.approx(-1.0, abs=1e-6)


def test_pair_loss_symmetric():
    gen = torch.Generator().manual_seed(1)
    a = [[torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)] for _ in range(3)]
    b = [[torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)] for _ in range(3)]
    for s in range(3):
        assert pair_loss(a, b, s).item() == pytest.approx(pair_loss(b, a, s).item(), abs=1e-7)
        assert pair_loss(a, b, s).item() == pytest.approx(formula_pair(a, b, s).item(), abs=1e-6)
    assert pair_loss_all_scales(a, b).item() == pytest.approx(formula_pair_all_scales(a, b).item(), abs=1e-6)


def test_stop_gradient_blocks_projection_targets():
    gen = torch.Generator().manual_seed(2)
    proj_a, pred_a, proj_b, pred_b = (torch.randn(3, 5, generator=gen, requires_grad=True) for _ in range(4))
    pair_loss([[proj_a, pred_a]], [[proj_b, pred_b]], 0).backward()
    assert proj_a.grad is None and proj_b.grad is None
    assert pred_a.grad is not None and pred_a.grad.abs().sum() > 0
    # The gradient on pred_a is that of -0.5 * mean cos(pred_a, proj_b) alone.
    pa = pred_a.detach().clone().requires_grad_(True)
    (-0.5 * F.cosine_similarity(pa, proj_b.detach()).mean()).backward()
    torch.testing.assert_close(pred_a.grad, pa.grad)


def test_beta_follows_the_runs_own_length():
    assert beta_schedule(0, 10) == pytest.approx(1.0)
    assert beta_schedule(5, 10) == pytest.approx(0.5)
    assert beta_schedule(10, 10) == pytest.approx(0.0, abs=1e-12)
    assert beta_schedule(120, 240) == pytest.approx(beta_schedule(1, 2))
    with pytest.raises(ValueError):
        beta_schedule(0, 0)


def test_split_views_is_view_major():
    proj = torch.arange(12.0).reshape(6, 2)  # 3 views x batch 2
    views = split_views([[proj, proj + 100]], 3)
    torch.testing.assert_close(views[1][0][0], proj[2:4])
    torch.testing.assert_close(views[2][0][1], proj[4:6] + 100)
    with pytest.raises(ValueError, match="multiple"):
        split_views([[proj, proj]], 4)


@pytest.mark.parametrize("epoch,total", [(0, 4), (3, 4)])
def test_objective_equals_official_step(epoch, total):
    """Same weights, views and scale draws: every term equals the official train_3d objective."""
    torch.manual_seed(0)
    ref = ReferencePCRLv23d(base=2)
    model = NonSkipUNet3D(width=2)
    model.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(3)
    b = 2
    x1, x2 = torch.randn(b, 1, 32, 32, 16, generator=gen), torch.randn(b, 1, 32, 32, 16, generator=gen)
    gt = torch.rand(b, 1, 32, 32, 16, generator=gen)
    local_views = [torch.randn(b, 1, 16, 16, 16, generator=gen) for _ in range(6)]

    ref_terms = reference_step_loss(ref, x1, x2, gt, local_views, epoch, total, random.Random(7))
    rest, f1, masks = model(x1)
    _, f2, _ = model(x2)
    _, fl, _ = model(torch.cat(local_views), local=True)
    terms = PCRLv2Loss(total_epochs=total)(rest, masks, f1, f2, fl, gt, epoch, random.Random(7))
    ours = (terms.total, terms.global_, terms.local, terms.restore, terms.deep)
    for a, r in zip(ours, ref_terms):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    # and the gradients agree
    terms.total.backward()
    ref_terms[0].backward()
    for (name, p), rp in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, rp.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_all_scales_uses_every_scale():
    gen = torch.Generator().manual_seed(4)
    f = lambda: [[torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)] for _ in range(3)]  # noqa: E731
    f1, f2 = f(), f()
    fl = [[torch.randn(12, 4, generator=gen), torch.randn(12, 4, generator=gen)] for _ in range(3)]
    gt = torch.rand(2, 1, 8, 8, 8, generator=gen)
    rest = torch.rand(2, 1, 8, 8, 8, generator=gen)
    masks = [torch.rand(2, 1, 8, 8, 8, generator=gen) for _ in range(3)]
    terms = PCRLv2Loss(total_epochs=2, all_scales=True)(rest, masks, f1, f2, fl, gt, 0, random.Random(0))
    assert terms.scale == -1 and terms.beta == 1.0  # epoch 0
    assert terms.global_.item() == pytest.approx(formula_pair_all_scales(f1, f2).item(), abs=1e-6)
    deep = sum(((m - gt) ** 2).mean() for m in masks) / 3
    assert terms.deep.item() == pytest.approx(deep.item(), abs=1e-6)
    views = [[[proj[2 * j:2 * j + 2], pred[2 * j:2 * j + 2]] for proj, pred in fl] for j in range(6)]
    local = sum(formula_pair_all_scales(a, v) for v in views for a in (f1, f2)) / 12
    assert terms.local.item() == pytest.approx(local.item(), abs=1e-6)
    restore = ((rest - gt) ** 2).mean()
    assert terms.restore.item() == pytest.approx(restore.item(), abs=1e-6)
    total = formula_pair_all_scales(f1, f2) + local + restore + deep
    assert terms.total.item() == pytest.approx(total.item(), abs=1e-5)
