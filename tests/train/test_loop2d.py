"""2D pretraining (--dims 2) on the 3D trainer's loop: runs, checkpoints, exact resume, loaders, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from pcrlv2_fast.checkpoint import CheckpointError, load_pretrained_2d
from pcrlv2_fast.cli import main
from pcrlv2_fast.data.images2d import load_images
from pcrlv2_fast.data.views2d import ViewConfig2D
from pcrlv2_fast.models import NonSkipUNet2D
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


def test_encoder_weights_start_the_run(tmp_path, bank):
    encoder = NonSkipUNet2D().encoder.state_dict()
    torchvision_like = {k: torch.full_like(v, 0.01) if v.is_floating_point() else v for k, v in encoder.items()}
    torchvision_like["fc.weight"], torchvision_like["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(torchvision_like, tmp_path / "resnet18.pth")
    trainer = Small(cfg2d(tmp_path, "w", steps=1, encoder_weights=str(tmp_path / "resnet18.pth")), bank)
    assert torch.equal(trainer.model.encoder.conv1.weight, torch.full((64, 3, 7, 7), 0.01))
    trainer.close()
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="wrong.pth"):
        Small(cfg2d(tmp_path, "w2", steps=1, encoder_weights=str(tmp_path / "wrong.pth")), bank)
    with pytest.raises(ValueError, match="needs --dims 2"):
        PretrainConfig(encoder_weights="x.pth").validate()


def _ddp_worker(rank: int, world: int, init_file: str, images: str, out: str) -> None:
    """One rank of a 2-process gloo run of the 2D trainer (synchronised batch norm), saving its final weights."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = cfg2d(Path(out), "ddp", batch_size=4, steps=2, sync_bn=True)
        trainer = Small(cfg, load_images(images, progress=False))
        try:
            trainer.run()
            torch.save(trainer.model.state_dict(), f"{out}/rank{rank}.pt")
        finally:
            trainer.close()
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path, xray_dir, bank, one_thread):  # noqa: F811
    import torch.multiprocessing as mp

    context = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "pg"), str(xray_dir), str(tmp_path)),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process 2D run did not finish in 300 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for k, v in ranks[0].items():
        assert torch.equal(v, ranks[1][k]), k  # same gradients and synchronised statistics on both ranks
    single = Small(cfg2d(tmp_path, "single", batch_size=4, steps=2), bank)
    before = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.run()
    moved = max((v.float() - before[k].float()).abs().max().item() for k, v in single.model.state_dict().items())
    assert moved > 2e-2
    for k, v in single.model.state_dict().items():
        # Batch norm over 4 samples at 2 x 2 pixels amplifies the rounding of summing statistics and gradients over
        # two ranks to ~7.5e-3 after two steps; per-rank batch norm (a wrong split) differs by ~300.
        torch.testing.assert_close(ranks[0][k].float(), v.float(), atol=2e-2, rtol=0, msg=k)


def test_images_stay_on_the_cpu_when_they_exceed_the_gpu_cache_budget(bank, capsys):
    from types import SimpleNamespace

    def fake(gb):  # the trainer's state the choice reads; no GPU is touched with --gpu-cache-gb given
        state = SimpleNamespace(device=torch.device("cuda", 0), cfg=SimpleNamespace(gpu_cache_gb=gb),
                                dist=SimpleNamespace(is_main=True))
        state._gpu_cache_budget = lambda: Pretrainer2D._gpu_cache_budget(state)
        return state

    assert Pretrainer2D._bank_device(fake(1.0), bank) == torch.device("cuda", 0)
    assert Pretrainer2D._bank_device(fake(bank.pixels.nbytes / 2**30 / 2), bank) == torch.device("cpu")
    assert "views built on the CPU (raise --gpu-cache-gb" in capsys.readouterr().err
