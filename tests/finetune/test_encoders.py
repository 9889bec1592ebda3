"""Drop-in encoders: loading from every checkpoint layout, export round trip, shapes, freezing, layer-wise lr."""

from collections import OrderedDict

import pytest
import torch

from pcrlv2_fast import CheckpointError, NonSkipUNet3D, save_checkpoint
from pcrlv2_fast.encoders import (
    ENCODER_STAGES,
    Classifier3D,
    LinearProbeSeg3D,
    PCRLv2Encoder3D,
    UNet3D,
    adapt_first_conv,
    encoder_state_dict,
    export_encoder,
    layerwise_param_groups,
)
from pcrlv2_fast.reference import ReferencePCRLv23d
from tests.helpers import assert_close


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Non-default BatchNorm statistics and affine weights, so a load that skipped them would show."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def _encoder_items(state):
    return {k: v for k, v in state.items() if k.startswith(ENCODER_STAGES)}


@pytest.fixture
def ours(tmp_path):
    torch.manual_seed(0)
    model = _trained_like(NonSkipUNet3D(width=2))
    path = save_checkpoint(tmp_path / "ours.pt", model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=3)
    return path, model


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_layout_loads_and_exports(tmp_path, prefix):
    torch.manual_seed(0)
    ref = _trained_like(ReferencePCRLv23d(base=2))
    state = OrderedDict((prefix + k, v) for k, v in ref.state_dict().items())
    path = tmp_path / "official.pt"
    opt = torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9)
    torch.save({"state_dict": state, "optimizer": opt.state_dict(), "epoch": 240}, path)

    encoder = PCRLv2Encoder3D.from_checkpoint(path)
    assert (encoder.width, encoder.in_channels, encoder.norm) == (2, 1, "bn")
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k

    out = export_encoder(path, tmp_path / "enc.pt")
    plain = torch.load(out, weights_only=True)
    assert set(plain) == set(_encoder_items(ref.state_dict()))
    fresh = PCRLv2Encoder3D(width=2)
    fresh.load_state_dict(plain, strict=True)
    # The exported file also loads into the full pretraining network (non-strict: decoder left as is).
    missing, unexpected = NonSkipUNet3D(width=2).load_state_dict(plain, strict=False)
    assert not unexpected and all(not k.startswith(ENCODER_STAGES) for k in missing)


def test_ours_export_round_trip_gives_the_same_features(tmp_path, ours):
    path, model = ours
    out = export_encoder(path, tmp_path / "exported.pt")
    encoder = PCRLv2Encoder3D.from_checkpoint(out)  # the exported file is itself a loadable checkpoint
    model.eval()
    encoder.eval()
    x = torch.randn(2, 1, 16, 24, 8)
    with torch.no_grad():
        for a, b in zip(encoder(x), model.encode(x)):
            assert_close(a, b, atol=1e-6, what="feature")
    # A fine-tuned network's checkpoint (encoder under 'encoder.') exports the same tensors.
    unet = UNet3D(2, encoder=encoder)
    ft = save_checkpoint(tmp_path / "ft.pt", unet, epoch=1, finetune={"arch": {}})
    again = export_encoder(ft, tmp_path / "again.pt")
    first, second = torch.load(out, weights_only=True), torch.load(again, weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_checkpoint_without_encoder_names_the_file(tmp_path):
    path = tmp_path / "classifier_only.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}}, path)
    for call in (lambda: PCRLv2Encoder3D.from_checkpoint(path), lambda: export_encoder(path, tmp_path / "x.pt"),
                 lambda: PCRLv2Encoder3D(width=2).load_encoder(path)):
        with pytest.raises(CheckpointError, match="no PCRLv2 encoder") as err:
            call()
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(garbage)):
        encoder_state_dict(garbage)
    assert not (tmp_path / "x.pt").exists()


def test_width_mismatch_lists_keys(ours):
    path, _ = ours
    with pytest.raises(CheckpointError, match="mis-shaped keys") as err:
        PCRLv2Encoder3D(width=4).load_encoder(path)
    assert str(path) in str(err.value)


def test_multichannel_input_adaptation_keeps_the_response(ours):
    path, model = ours
    encoder = PCRLv2Encoder3D.from_checkpoint(path, in_channels=4)
    assert encoder.down_tr64.ops[0].conv1.weight.shape[1] == 4
    model.eval()
    encoder.eval()
    x = torch.randn(1, 1, 8, 16, 8)
    with torch.no_grad():
        for a, b in zip(encoder(x.expand(-1, 4, -1, -1, -1)), model.encode(x)):
            assert_close(a, b, atol=1e-5, what="4 equal channels vs 1")
    w = torch.randn(5, 2, 3, 3, 3)
    assert_close(adapt_first_conv(w, 3), w.sum(1, keepdim=True).expand(-1, 3, -1, -1, -1) / 3, what="rule")


def test_norm_conversion_carries_affine_weights(tmp_path, ours):
    path, model = ours
    for norm in ("gn", "in"):
        encoder = PCRLv2Encoder3D.from_checkpoint(path, norm=norm)
        assert not any("running_mean" in k for k in encoder.state_dict())
        assert torch.equal(encoder.down_tr128.ops[1].bn1.weight, model.down_tr128.ops[1].bn1.weight)
    gn = PCRLv2Encoder3D(width=2, norm="gn")
    gn_path = save_checkpoint(tmp_path / "gn.pt", gn)
    bn = PCRLv2Encoder3D.from_checkpoint(gn_path, norm="bn")
    assert torch.equal(bn.down_tr64.ops[0].bn1.running_var, torch.ones(2))


@pytest.mark.parametrize("size", [(13, 17, 9), (8, 8, 8), (5, 30, 11), (1, 2, 3)])
def test_skip_unet_shapes_for_odd_sizes(size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, requires_grad=True)
    unet = UNet3D(num_classes=4, in_channels=3, width=2, norm="gn")
    y = unet(x)
    assert y.shape == (2, 4, *size)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    probe = LinearProbeSeg3D(3, PCRLv2Encoder3D(in_channels=3, width=2))
    assert probe(x.detach()).shape == (2, 3, *size)
    assert Classifier3D(2, in_channels=3, width=2, pool="avgmax", hidden=8)(x.detach()).shape == (2, 2)


def test_unet_pads_by_replicating_the_border_and_crops_back():
    """An odd input gives the first voxels of the output for the input padded (replicate) to a multiple of 8."""
    torch.manual_seed(0)
    unet = UNet3D(2, width=2).eval()
    x = torch.randn(1, 1, 13, 16, 7)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 0, 0, 3), mode="replicate")
    with torch.no_grad():
        assert_close(unet(x), unet(padded)[:, :, :13, :, :7], atol=1e-6, what="padded run")


def test_freeze_keeps_batchnorm_statistics():
    unet = UNet3D(2, width=2)
    unet.encoder.freeze(2)
    unet.train()
    frozen = [unet.encoder.down_tr64, unet.encoder.down_tr128]
    assert all(not p.requires_grad for s in frozen for p in s.parameters())
    assert all(p.requires_grad for p in unet.encoder.down_tr256.parameters())
    assert not frozen[0].ops[0].bn1.training and unet.encoder.down_tr256.ops[0].bn1.training
    before = frozen[0].ops[0].bn1.running_mean.clone()
    unet(torch.randn(2, 1, 8, 8, 8))
    assert torch.equal(before, frozen[0].ops[0].bn1.running_mean)
    names = {g["name"] for g in layerwise_param_groups(unet, 1e-3)}
    assert not names & {"down_tr64", "down_tr128"} and "down_tr256" in names


def test_layerwise_learning_rates():
    unet = UNet3D(2, width=2)
    groups = layerwise_param_groups(unet, lr=1.0, layer_decay=0.5, weight_decay=0.1)
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["head"] == 1.0 and lr["down_tr512"] == 0.5 and lr["down_tr256"] == 0.25
    assert lr["down_tr128"] == 0.125 and lr["down_tr64"] == 0.0625
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in unet.parameters())
    with pytest.raises(ValueError, match="layer_decay"):
        layerwise_param_groups(unet, 1.0, layer_decay=0.0)
