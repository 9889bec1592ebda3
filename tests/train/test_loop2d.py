"""2D pretraining (--dims 2) on the 3D trainer's loop: runs, checkpoints, exact resume, loaders, errors."""

from __future__ import annotations

import json

import pytest
import torch

from pcrlv2_fast.checkpoint import load_pretrained_2d
from pcrlv2_fast.cli import main
from pcrlv2_fast.data.images2d import load_images
from pcrlv2_fast.data.views2d import ViewConfig2D
from pcrlv2_fast.train import PretrainConfig
from pcrlv2_fast.train.loop2d import Pretrainer2D, pretrain
from tests.data2d.conftest import xray_dir  # noqa: F401  (fixture)


class Small(Pretrainer2D):
    views = ViewConfig2D(global_size=64, local_size=32)


def cfg2d(tmp_path, name, **kw) -> PretrainConfig:
    base = dict(data="", out=str(tmp_path / name), dims=2, batch_size=2, steps=3, lr=1e-2, pictures=False,
                tensorboard=False, overwrite=True)
    return PretrainConfig(**{**base, **kw})


@pytest.fixture
def bank(xray_dir):  # noqa: F811
    return load_images(xray_dir, progress=False)


def test_run_writes_metrics_pictures_and_a_whole_2d_checkpoint(tmp_path, bank):
    trainer = Small(cfg2d(tmp_path, "run", pictures=True, precision="bf16", channels_last=True), bank)
    summary = trainer.run()
    assert trainer.steps_per_epoch == 3 and summary["steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "loss_global", "loss_local", "loss_restore"))
    assert (tmp_path / "run" / "restoration.png").stat().st_size > 1000
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["arch"]["dims"] == 2
    model = load_pretrained_2d(tmp_path / "run" / "checkpoint.pt")
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v.contiguous(), msg=k)


def test_resume_continues_exactly(tmp_path, bank, monkeypatch):
    full = Small(cfg2d(tmp_path, "full", steps=4, save_every=1), bank)
    full.run()
    cut_cfg = cfg2d(tmp_path, "cut", steps=4, save_every=1)
    original = Small.train_step
    calls = {"n": 0}

    def crash_on_third(self, batch, epoch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch, epoch)

    monkeypatch.setattr(Small, "train_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        Small(cut_cfg, bank).run()
    monkeypatch.setattr(Small, "train_step", original)
    cut_cfg.resume = "auto"
    resumed = Small(cut_cfg, bank)
    resumed.run()
    assert resumed.step == 4
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_per_sample_and_batched_loaders_train_alike(tmp_path, bank):
    losses = {}
    for loader in ("dataset", "torch"):
        Small(cfg2d(tmp_path, loader, steps=1, loader=loader), bank).run()
        losses[loader] = json.loads((tmp_path / loader / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert abs(losses["dataset"] - losses["torch"]) < 1e-4


def test_options_the_2d_path_lacks_are_clear_errors(tmp_path, xray_dir, capsys):  # noqa: F811
    for args, words in [(["--kernels", "triton"], "fused Triton kernels are 3D"),
                        (["--crop-scale", "0.5"], "official sizes"),
                        (["--loader", "native"], "--loader native is not available with --dims 2")]:
        assert main(["pretrain", "--data", str(xray_dir), "--out", str(tmp_path / "e"), "--dims", "2", *args]) == 2
        assert words in capsys.readouterr().err
    # A folder of 2D images given to the 3D trainer says what it holds and what to do.
    assert main(["pretrain", "--data", str(xray_dir), "--out", str(tmp_path / "e"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "holds 2D images" in err and "with --dims 2" in err
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        PretrainConfig(dims=1).validate()


def test_cli_pretrains_a_folder_of_images(tmp_path, xray_dir, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(Pretrainer2D, "views", ViewConfig2D(global_size=64, local_size=32))
    code = main(["pretrain", "--data", str(xray_dir), "--out", str(tmp_path / "cli"), "--dims", "2", "--steps", "2",
                 "--batch-size", "2", "--no-pictures", "--no-tensorboard"])
    assert code == 0
    assert "2D data: 6 images" in capsys.readouterr().err
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["steps"] == 2
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["dims"] == 2


def test_pretrain_dispatches_on_dims(tmp_path, bank, monkeypatch):
    monkeypatch.setattr(Pretrainer2D, "views", ViewConfig2D(global_size=64, local_size=32))
    summary = pretrain(cfg2d(tmp_path, "d", steps=1), bank)
    assert summary["steps"] == 1 and summary["fused_blocks"] == {"conv": "0/0", "norm_act": "0/0"}
