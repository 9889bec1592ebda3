"""The 2D PCRLv2 network: official key names and shapes (the listing of the official 2D branch), outputs, init."""

from __future__ import annotations

import re

import pytest
import torch

from pcrlv2_fast.models import NonSkipUNet2D, ResNet18Encoder

_BLOCK_KEYS = re.compile(r"model\.decoder\.blocks\.[0-4]\.(conv1\.[01]|conv2\.[01]|bn|deep_supervision_head\.[013]|"
                         r"predictor_head\.[013])\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def test_encoder_is_torchvision_resnet18_without_fc():
    state = ResNet18Encoder().state_dict()
    assert len(state) == 120 and sum(p.numel() for p in ResNet18Encoder().parameters()) == 11_176_512
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert {k.rsplit(".", 1)[0] for k in state if "downsample" in k} == {
        f"layer{i}.0.downsample.{j}" for i in (2, 3, 4) for j in (0, 1)}
    assert not any(k.startswith("fc.") for k in state)
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in state if k.startswith("layer")}
    assert blocks == {f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)}


def test_whole_model_keys_follow_the_official_names():
    state = NonSkipUNet2D().state_dict()
    others = [k for k in state if not k.startswith("model.encoder.")]
    assert all(_BLOCK_KEYS.match(k) or k in ("model.segmentation_head.0.weight", "model.segmentation_head.0.bias")
               for k in others), [k for k in others if not _BLOCK_KEYS.match(k)][:5]
    widths = (512, 256, 128, 64, 32, 16)
    for i in range(5):
        assert state[f"model.decoder.blocks.{i}.conv1.0.weight"].shape == (widths[i + 1], widths[i], 3, 3)
        assert state[f"model.decoder.blocks.{i}.deep_supervision_head.3.weight"].shape == (3, widths[i + 1], 1, 1)
        assert state[f"model.decoder.blocks.{i}.predictor_head.0.weight"].shape == (2 * widths[i + 1], widths[i + 1])
        assert f"model.decoder.blocks.{i}.conv1.0.bias" not in state  # conv before BatchNorm: no bias
    assert state["model.segmentation_head.0.weight"].shape == (3, 16, 3, 3)


def test_global_and_local_outputs():
    torch.manual_seed(0)
    model = NonSkipUNet2D().eval()
    restoration, features, masks = model(torch.randn(2, 3, 64, 96))
    assert restoration.shape == (2, 3, 64, 96)
    assert [tuple(p.shape) for p, _ in features] == [(2, c) for c in (256, 128, 64, 32, 16)]
    assert all(pred.shape == proj.shape for proj, pred in features)
    assert [tuple(m.shape) for m in masks] == [(2, 3, 64, 96)] * 5
    restoration, features, masks = model(torch.randn(3, 3, 32, 32), local=True)
    assert restoration is None and masks == [] and len(features) == 5
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"expected input \(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))


def test_deep_supervision_masks_are_the_heads_upsampled_bilinearly():
    torch.manual_seed(0)
    model = NonSkipUNet2D().eval()
    x = torch.randn(1, 3, 64, 64)
    _, _, masks = model(x)
    out = model.encoder(x)[-1]
    for i, block in enumerate(model.blocks):
        out, _, _, mask = block(out)
        expected = torch.nn.functional.interpolate(mask, size=(64, 64), mode="bilinear")
        torch.testing.assert_close(masks[i], expected)


def test_official_initialisation():
    model = NonSkipUNet2D()
    block = model.blocks[2]
    assert torch.all(block.conv1[1].weight == 1) and torch.all(block.conv1[1].bias == 0)
    assert torch.all(block.predictor_head[0].bias == 0) and torch.all(model.model.segmentation_head[0].bias == 0)
    # Kaiming uniform (fan in, ReLU) for decoder convs: bound sqrt(6 / fan_in).
    w = block.conv1[0].weight
    assert w.abs().max() <= (6 / (w.shape[1] * 9)) ** 0.5 and w.std() > 0


def _official_2d_checkpoint(path, encoder_state):
    import argparse

    torch.save({"opt": argparse.Namespace(lr=0.01, epochs=240), "state_dict": encoder_state,
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 240}, path)
    return path


def test_official_encoder_only_checkpoint_loads_strictly(tmp_path):
    from pcrlv2_fast import CheckpointError, load_pretrained_2d

    torch.manual_seed(1)
    source = ResNet18Encoder().state_dict()
    path = _official_2d_checkpoint(tmp_path / "official.pt", source)
    model = load_pretrained_2d(path)
    assert all(torch.equal(v, source[k]) for k, v in model.encoder.state_dict().items())
    # A torchvision state_dict carries the classifier too: it is left out.
    tv = dict(source, **{"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save(tv, tmp_path / "resnet18.pth")
    assert torch.equal(load_pretrained_2d(tmp_path / "resnet18.pth").encoder.conv1.weight, source["conv1.weight"])
    # Strict: a missing or mis-shaped key is one error naming it.
    broken = dict(source)
    del broken["layer3.1.bn2.running_var"]
    broken["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(1\).*layer3\.1\.bn2\.running_var.*conv1\.weight"):
        load_pretrained_2d(_official_2d_checkpoint(tmp_path / "broken.pt", broken))


def test_whole_2d_model_round_trip(tmp_path):
    from pcrlv2_fast import CheckpointError, load_pretrained_2d, save_checkpoint

    torch.manual_seed(2)
    model = NonSkipUNet2D()
    path = save_checkpoint(tmp_path / "whole.pt", model, epoch=3)
    loaded = load_pretrained_2d(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    state = model.state_dict()
    state.pop("model.decoder.blocks.4.bn.weight")
    torch.save({"state_dict": state}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="A whole PCRLv2 2D model"):
        load_pretrained_2d(tmp_path / "partial.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_encoder_writes_the_resnet18_under_torchvision_names(tmp_path, suffix, capsys):
    from pcrlv2_fast.checkpoint import CheckpointError
    from pcrlv2_fast.cli import main
    from pcrlv2_fast.encoders import encoder_state_dict
    from pcrlv2_fast.models import Classifier2D

    model = NonSkipUNet2D()
    torch.nn.init.normal_(model.encoder.layer4[1].conv2.weight)
    torch.save({"state_dict": model.state_dict(), "step": 3}, tmp_path / "checkpoint.pt")
    out = tmp_path / f"encoder{suffix}"
    assert main(["export-encoder", str(tmp_path / "checkpoint.pt"), "--out", str(out)]) == 0
    assert "ResNet-18 encoder, 120 tensors" in capsys.readouterr().out
    from pcrlv2_fast.checkpoint import extract_state_dict, read_checkpoint

    state = extract_state_dict(read_checkpoint(out), out)
    assert len(state) == 120 and all(not k.startswith(("model.", "encoder.", "fc.")) for k in state)
    encoder = ResNet18Encoder()
    encoder.load_state_dict(state, strict=True)
    assert torch.equal(encoder.layer4[1].conv2.weight, model.encoder.layer4[1].conv2.weight)
    # A fine-tuned classifier exports its encoder too; a 3D reader refuses a 2D file with its own error.
    classifier = Classifier2D(2)
    classifier.encoder.load_state_dict(model.encoder.state_dict())
    torch.save({"state_dict": classifier.state_dict()}, tmp_path / "best.pt")
    assert main(["export-encoder", str(tmp_path / "best.pt"), "--out", str(tmp_path / "e2.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "e2.pt", weights_only=True)["conv1.weight"], model.encoder.conv1.weight)
    with pytest.raises(CheckpointError, match="no PCRLv2 encoder"):
        encoder_state_dict(out)
