import argparse
from collections import OrderedDict

import numpy as np
import pytest
import torch

from pcrlv2_fast import CheckpointError, NonSkipUNet3D, load_pretrained, save_checkpoint
from pcrlv2_fast.reference import ReferencePCRLv23d


def official_checkpoint(tmp_path, prefix="", width=32, name="official.pt"):
    """A checkpoint laid out as the official train_3d saves it (optionally from the DataParallel wrapper)."""
    torch.manual_seed(0)
    ref = ReferencePCRLv23d(base=width)
    opt = torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    state = OrderedDict((prefix + k, v) for k, v in ref.state_dict().items())
    path = tmp_path / name
    # The official train_3d stores its argparse options under 'opt'; logged values are often numpy scalars.
    args = argparse.Namespace(lr=1e-3, b=16, epochs=240, gpus="0,1", ratio=np.float64(1.0))
    torch.save({"opt": args, "state_dict": state, "optimizer": opt.state_dict(), "epoch": 240,
                "loss": np.float32(0.25)}, path)
    return path, ref


@pytest.mark.parametrize("prefix", ["", "module."])
def test_load_official_checkpoint_strict(tmp_path, prefix):
    path, ref = official_checkpoint(tmp_path, prefix)
    model = load_pretrained(path)
    assert isinstance(model, NonSkipUNet3D) and model.width == 32
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    ref.eval()
    model.eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)


def test_load_bare_state_dict_and_into_given_model(tmp_path):
    ref = ReferencePCRLv23d(base=4)
    path = tmp_path / "bare.pth"
    torch.save(ref.state_dict(), path)
    model = NonSkipUNet3D(width=4)
    assert load_pretrained(path, model=model) is model
    assert torch.equal(model.down_tr64.ops[0].conv1.weight, ref.down_tr64.ops[0].conv1.weight)


def test_wrong_architecture_lists_mismatched_keys(tmp_path):
    path, _ = official_checkpoint(tmp_path, width=16)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, model=NonSkipUNet3D(width=32))
    msg = str(err.value)
    assert str(path) in msg and "mis-shaped keys (" in msg and "down_tr64.ops.0.conv1.weight" in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = NonSkipUNet3D(width=2).state_dict()
    state.pop("out_tr.final_conv.bias")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert "missing keys (1)" in msg and "out_tr.final_conv.bias" in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg


def test_other_network_and_corrupt_files(tmp_path):
    other = tmp_path / "resnet.pt"
    torch.save({"state_dict": torch.nn.Linear(3, 4).state_dict()}, other)
    with pytest.raises(CheckpointError, match="not a PCRLv2 3D checkpoint"):
        load_pretrained(other)
    good, _ = official_checkpoint(tmp_path, width=2)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained(truncated)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_pretrained(tmp_path / "missing.pt")


def test_saved_checkpoint_has_official_layout_and_round_trips(tmp_path):
    model = NonSkipUNet3D(width=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", model, opt, epoch=3, step=12)
    ckpt = torch.load(path, weights_only=True)
    assert {"state_dict", "optimizer", "epoch"} <= set(ckpt) and ckpt["epoch"] == 3 and ckpt["step"] == 12
    assert len(ckpt["state_dict"]) == 169
    ReferencePCRLv23d(base=2).load_state_dict(ckpt["state_dict"], strict=True)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = NonSkipUNet3D(width=2)
    path = save_checkpoint(tmp_path / "checkpoint.pt", model, epoch=1)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
