"""The objective on the 2D network: the official train_2d terms over the five decoder scales."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from pcrlv2_fast.losses import PCRLv2Loss
from pcrlv2_fast.models import NonSkipUNet2D


def official_2d_loss(out1, out2, out_local, gt, beta, rng: random.Random, n_local: int):
    """train_2d.py's step, written out: restoration MSE, the global pair at one scale, every local view against
    both global views (each its own scale, averaged over 2 * n_local), beta * the deep supervision at the global
    pair's scale."""

    def cos(a, b):
        return (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(dim=1).mean()

    def pair(fa, fb, s):
        (pa, qa), (pb, qb) = fa[s], fb[s]
        return -0.5 * (cos(qa, pb.detach()) + cos(qb, pa.detach()))

    (rec, f1, masks1), (_, f2, _), (_, fl, _) = out1, out2, out_local
    s = rng.randint(0, 4)
    loss = F.mse_loss(rec, gt) + pair(f1, f2, s)
    local = 0
    b = gt.shape[0]
    for j in range(n_local):
        view = [[p[j * b:(j + 1) * b], q[j * b:(j + 1) * b]] for p, q in fl]
        for anchor in (f1, f2):
            local = local + pair(anchor, view, rng.randint(0, 4))
    return loss + local / (2 * n_local) + beta * F.mse_loss(masks1[s], gt)


def test_loss_on_the_2d_network_matches_the_official_terms():
    torch.manual_seed(0)
    model = NonSkipUNet2D()
    x1, x2, gt = torch.randn(3, 2, 3, 64, 64).unbind(0)
    loc = torch.randn(6 * 2, 3, 32, 32)
    out1, out2, out_local = model(x1), model(x2), model(loc, local=True)
    assert len(out1[1]) == 5 and len(out1[2]) == 5 and all(m.shape == (2, 3, 64, 64) for m in out1[2])
    loss_fn = PCRLv2Loss(total_epochs=30, n_local=6)
    terms = loss_fn(out1[0], out1[2], out1[1], out2[1], out_local[1], gt, epoch=10, rng=random.Random(7))
    beta = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 10 / 30))).item()  # over the run's 30 epochs, not 240
    assert abs(terms.beta - beta) < 1e-9
    expected = official_2d_loss(out1, out2, out_local, gt, beta, random.Random(7), 6)
    torch.testing.assert_close(terms.total, expected, rtol=1e-5, atol=1e-6)
    assert 0 <= terms.scale <= 4
    terms.total.backward()
    heads = [b.deep_supervision_head[0].weight.grad for b in model.up_blocks]
    assert [g is not None for g in heads] == [i == terms.scale for i in range(5)]  # one deep-supervision scale
