import pytest
import torch

from pcrlv2_fast.models import NonSkipUNet3D
from pcrlv2_fast.reference import ReferencePCRLv23d

# A sample of the official PCRLv23d state-dict names (RL4M/PCRLv2, models/pcrlv2_model_3d.py).
OFFICIAL_KEYS = {
    "down_tr64.ops.0.conv1.weight": (32, 1, 3, 3, 3),
    "down_tr64.ops.1.bn1.running_var": (64,),
    "down_tr128.ops.1.conv1.weight": (128, 64, 3, 3, 3),
    "down_tr512.ops.1.conv1.bias": (512,),
    "down_tr512.ops.1.bn1.num_batches_tracked": (),
    "up_tr256.up_conv.weight": (512, 512, 2, 2, 2),
    "up_tr256.ops.0.conv1.weight": (256, 512, 3, 3, 3),
    "up_tr256.bn.running_mean": (256,),
    "up_tr256.predictor_head.0.weight": (512, 256),
    "up_tr256.predictor_head.1.running_mean": (512,),
    "up_tr256.predictor_head.3.weight": (256, 512),
    "up_tr256.deep_supervision_head.conv1.weight": (1, 256, 3, 3, 3),
    "up_tr128.up_conv.weight": (256, 256, 2, 2, 2),
    "up_tr64.ops.1.conv1.weight": (64, 64, 3, 3, 3),
    "up_tr64.deep_supervision_head.bn1.weight": (1,),
    "out_tr.final_conv.weight": (1, 64, 1, 1, 1),
}


def randomize_bn_stats(model: torch.nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def test_official_key_names_and_shapes():
    sd = NonSkipUNet3D().state_dict()
    assert len(sd) == 169
    for key, shape in OFFICIAL_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    ref = ReferencePCRLv23d().state_dict()
    assert list(sd) == list(ref)
    assert all(sd[k].shape == ref[k].shape for k in sd)
    n_params = sum(p.numel() for p in NonSkipUNet3D().parameters())
    assert 17.0e6 < n_params < 17.2e6


@pytest.mark.parametrize("width", [2, 4])
def test_forward_shapes(width):
    model = NonSkipUNet3D(width=width)
    rest, feats, masks = model(torch.rand(2, 1, 64, 64, 32))
    assert rest.shape == (2, 1, 64, 64, 32)
    assert [tuple(f[0].shape) for f in feats] == [(2, 8 * width), (2, 4 * width), (2, 2 * width)]
    assert all(f[0].shape == f[1].shape for f in feats)
    assert [tuple(m.shape) for m in masks] == [(2, 1, 64, 64, 32)] * 3
    assert 0 <= rest.min() and rest.max() <= 1
    rest, feats, masks = model(torch.rand(4, 1, 16, 16, 16), local=True)
    assert rest.shape == (4, 1, 16, 16, 16) and masks == []


def _compare_with_reference(width, shape, train):
    gen = torch.Generator().manual_seed(0)
    ref = ReferencePCRLv23d(base=width)
    randomize_bn_stats(ref, gen)
    model = NonSkipUNet3D(width=width)
    model.load_state_dict(ref.state_dict(), strict=True)
    ref.train(train)
    model.train(train)
    x = torch.rand(*shape, generator=gen)
    with torch.no_grad():
        r_out, r_feats, r_masks = ref(x)
        out, feats, masks = model(x)
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-6)
    for (p, q), (rp, rq) in zip(feats, r_feats):
        torch.testing.assert_close(p, rp, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(q, rq, rtol=1e-4, atol=1e-5)
    for m, rm in zip(masks, r_masks):
        torch.testing.assert_close(m, rm, rtol=1e-5, atol=1e-6)
    if train:  # running statistics are updated identically
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, ref.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)


def test_eval_outputs_equal_official_full_width():
    _compare_with_reference(32, (2, 1, 16, 16, 16), train=False)


def test_train_outputs_equal_official_small_width():
    _compare_with_reference(4, (3, 1, 32, 32, 16), train=True)


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = NonSkipUNet3D(width=4).eval()
    x = torch.rand(2, 1, 32, 32, 16)
    with torch.no_grad():
        a = model(x)[0]
        model_cl = model.to(memory_format=torch.channels_last_3d)
        b = model_cl(x.contiguous(memory_format=torch.channels_last_3d))[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm,act", [("gn", "relu"), ("in", "elu"), ("bn", "prelu")])
def test_norm_and_activation_variants(norm, act):
    model = NonSkipUNet3D(width=2, norm=norm, act=act)
    rest, feats, masks = model(torch.rand(2, 1, 32, 32, 16))
    rest.mean().backward()
    assert rest.shape == (2, 1, 32, 32, 16) and len(masks) == 3
    if act == "prelu":
        assert "down_tr64.ops.0.activation.weight" in model.state_dict()


def test_bad_input_shapes():
    model = NonSkipUNet3D(width=2)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(2, 1, 20, 16, 16))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.rand(2, 16, 16, 16))
    with pytest.raises(ValueError, match="norm"):
        NonSkipUNet3D(norm="layer")
