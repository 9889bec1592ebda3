import json

import pytest
import torch

from pcrlv2_fast import load_pretrained
from pcrlv2_fast.cli import main as cli_main
from pcrlv2_fast.models import NonSkipUNet3D
from pcrlv2_fast.reference import ReferencePCRLv23d, reference_step_loss
from pcrlv2_fast.train import PretrainConfig, Pretrainer, pretrain
from pcrlv2_fast.train.loop import epoch_order, local_batch
from pcrlv2_fast.train.optim import lr_at_epoch
from pcrlv2_fast.train.step import step_rng
from tests import requirements


def tiny(tmp_path, name="run", **kw):
    return PretrainConfig.from_name("tiny", data="unused", out=str(tmp_path / name), **kw)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_schedule_and_order_helpers():
    assert lr_at_epoch(0.1, 0, 4) == pytest.approx(0.1)
    assert lr_at_epoch(0.1, 2, 4) == pytest.approx(0.05)
    assert sorted(epoch_order(0, 1, 10).tolist()) == list(range(10))
    assert (epoch_order(0, 1, 10) == epoch_order(0, 1, 10)).all()
    assert step_rng(3, 7).random() == step_rng(3, 7).random() != step_rng(3, 8).random()
    loc = torch.arange(2 * 3).reshape(2, 3, 1, 1, 1, 1).float()  # batch 2, 3 views
    assert local_batch(loc).flatten().tolist() == [0, 3, 1, 4, 2, 5]  # view-major like torch.cat(local_views)


def test_tiny_run_writes_official_checkpoint_and_metrics(tmp_path, phantom_volumes):
    cfg = tiny(tmp_path, steps=3, pictures=True)
    summary = pretrain(cfg, phantom_volumes)
    out = tmp_path / "run"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"state_dict", "optimizer", "epoch"} <= set(ckpt) and ckpt["step"] == 3
    assert len(ckpt["state_dict"]) == 169
    ReferencePCRLv23d(base=2).load_state_dict(ckpt["state_dict"], strict=True)
    assert load_pretrained(out / "checkpoint.pt").width == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "loss_global", "loss_local", "loss_restore"))
        assert -1.0 <= r["loss_global"] <= 1.0 and r["loss_restore"] >= 0
    assert summary["steps"] == 3 and summary["samples_per_s"] > 0
    assert summary["fused_blocks"] == {"conv": "0/17", "norm_act": "0/17"}  # --kernels torch
    for name in ("restoration.png", "loss_curve.png", "summary.json", "config.json"):
        assert (out / name).stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_engine_step_equals_official_step(tmp_path, phantom_volumes):
    """One step of the loop (fp32) moves the weights exactly as the official step on the same batch."""
    trainer = Pretrainer(tiny(tmp_path, steps=1, lr=0.05), phantom_volumes)
    ref = ReferencePCRLv23d(base=2)
    ref.load_state_dict(trainer.model.state_dict())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    batch = next(iter(trainer.batches(0, 0)))
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.05
    out = trainer.train_step(batch, epoch=0)
    assert not out.skipped

    local_views = list(batch["locals"].unbind(1))
    rng = step_rng(trainer.cfg.seed, 0)
    loss = reference_step_loss(ref, batch["x1"], batch["x2"], batch["gt"], local_views, 0,
                               trainer.total_epochs, rng)[0]
    ref_opt.zero_grad()
    loss.backward()
    ref_opt.step()
    assert out.terms["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_resume_continues_exactly(tmp_path, phantom_volumes, monkeypatch):
    full = Pretrainer(tiny(tmp_path, "full", steps=4, save_every=1, pairs_per_volume=3), phantom_volumes)
    full.run()
    expected = params(full.model)

    cfg = tiny(tmp_path, "cut", steps=4, save_every=1, pairs_per_volume=3)
    original = Pretrainer.train_step
    calls = {"n": 0}

    def crash_on_third(self, batch, epoch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch, epoch)

    monkeypatch.setattr(Pretrainer, "train_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        Pretrainer(cfg, phantom_volumes).run()
    monkeypatch.setattr(Pretrainer, "train_step", original)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2

    cfg.resume = "auto"
    resumed = Pretrainer(cfg, phantom_volumes)
    resumed.run()
    assert resumed.step == 4
    for k, v in expected.items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_channels_last_steps_are_finite(tmp_path, phantom_volumes, precision):
    # fp16: the gradient scaler starts at 2^16 and skips the steps whose scaled gradients overflow (halving the
    # scale each time), so give it a few steps; at least one must be applied.
    steps = 2 if precision == "bf16" else 3
    trainer = Pretrainer(tiny(tmp_path, steps=steps, precision=precision, channels_last=True), phantom_volumes)
    before = params(trainer.model)
    trainer.run()
    after = params(trainer.model)
    assert trainer.skipped < steps
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v.float()).all() for v in after.values())


def test_nonfinite_loss_step_is_skipped(tmp_path, phantom_volumes):
    trainer = Pretrainer(tiny(tmp_path, steps=1), phantom_volumes)
    batch = next(iter(trainer.batches(0, 0)))
    batch["gt"] = batch["gt"] * float("nan")
    before = params(trainer.model)
    assert trainer.train_step(batch, epoch=0).skipped
    after = params(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(("running_mean", "running_var",
                                                                                     "num_batches_tracked")))


def test_config_validation_and_presets(tmp_path, phantom_volumes):
    with pytest.raises(ValueError, match="precision"):
        PretrainConfig(precision="fp8").validate()
    with pytest.raises(ValueError, match="batch_size"):
        PretrainConfig(batch_size=1).validate()
    with pytest.raises(ValueError, match="unknown preset"):
        PretrainConfig.from_name("huge")
    assert PretrainConfig.from_name("official").width == 32
    with pytest.raises(ValueError, match="lower --batch-size"):
        Pretrainer(tiny(tmp_path, batch_size=64), phantom_volumes)


def test_cli_pretrain_and_errors(tmp_path, phantom_dir, capsys):
    out = tmp_path / "cli"
    code = cli_main(["pretrain", "--data", str(phantom_dir), "--out", str(out), "--preset", "tiny", "--steps", "1",
                     "--no-pictures"])
    assert code == 0 and (out / "checkpoint.pt").exists()
    assert "throughput" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["pretrain", "--data", str(empty), "--out", str(tmp_path / "x"), "--preset", "tiny"]) == 2
    assert str(empty) in capsys.readouterr().err
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    code = cli_main(["pretrain", "--data", str(phantom_dir), "--out", str(tmp_path / "y"), "--preset", "tiny",
                     "--resume", str(bad_ckpt)])
    assert code == 2 and "bad.pt" in capsys.readouterr().err


def test_model_width_matches_config(tmp_path, phantom_volumes):
    trainer = Pretrainer(tiny(tmp_path, width=3), phantom_volumes)
    assert isinstance(trainer.model, NonSkipUNet3D) and trainer.model.width == 3
    assert trainer.total_steps == 2 and trainer.steps_per_epoch == len(trainer.dataset) // 2


def test_fresh_run_never_mixes_with_an_earlier_run(tmp_path, phantom_volumes):
    pretrain(tiny(tmp_path, steps=2), phantom_volumes)
    with pytest.raises(ValueError, match="already holds a run"):
        pretrain(tiny(tmp_path, steps=1), phantom_volumes)
    pretrain(tiny(tmp_path, steps=1, overwrite=True), phantom_volumes)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1]


def test_unavailable_device_is_a_clear_error(tmp_path, phantom_volumes):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        Pretrainer(tiny(tmp_path, device="cuda"), phantom_volumes)


def test_pretrain_on_real_ct_and_mr(tmp_path, shared_data):
    """End to end on real scans: a CT (3 mm, resampled to 1 mm) and an MR slab, two steps, then reload."""
    from pcrlv2_fast.data import load_scan

    folder = shared_data / "totalseg-examples"
    paths = [folder / "aorta_ct_cropped.nii.gz", folder / "example_mr_sm.nii.gz"]
    if not all(p.exists() for p in paths):
        requirements.skip("shared-data", f"real scans not present in {folder}")
    volumes = [load_scan(p) for p in paths]
    assert [v.modality for v in volumes] == ["ct", "mr"]
    summary = pretrain(tiny(tmp_path, steps=2, width=4, precision="bf16", channels_last=True), volumes)
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert load_pretrained(tmp_path / "run" / "checkpoint.pt").width == 4


def test_official_loss_limit_skips_only_after_epoch_10(tmp_path, phantom_volumes):
    """The official rule: a step whose loss exceeds ``skip_loss_above`` (1000) after epoch 10 is skipped. With the
    limit below any reachable loss, steps of epochs 0-10 train and every later step is skipped, weights unmoved."""
    # 2 scans x 1 pair, batch 2: one step per epoch, so step i runs in epoch i - 1.
    cfg = tiny(tmp_path, steps=13, pairs_per_volume=1, skip_loss_above=-1e9, max_nonfinite=0, tensorboard=False)
    trainer = Pretrainer(cfg, phantom_volumes)
    assert trainer.steps_per_epoch == 1
    snapshots = []
    for epoch in range(13):
        trainer.step = epoch
        out = trainer.train_step(next(iter(trainer.batches(epoch, 0))), epoch)
        snapshots.append(params(trainer.model))
        assert out.skipped == (epoch > 10) and out.reason == ("loss_limit" if epoch > 10 else None), epoch
    for name, value in snapshots[10].items():
        assert torch.equal(snapshots[12][name], value), name  # skipped steps move nothing, running stats included
    assert any(not torch.equal(snapshots[9][k], v) for k, v in snapshots[10].items())  # epoch 10 still trains
    assert PretrainConfig().skip_loss_above == 1000.0


def test_official_preset_is_the_published_recipe(tmp_path, phantom_volumes):
    cfg = PretrainConfig.from_name("official", data="unused", out=str(tmp_path / "run"))
    assert (cfg.width, cfg.batch_size, cfg.epochs, cfg.steps) == (32, 32, 240, None)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 1e-3, 0.9, 1e-4)
    assert (cfg.norm, cfg.act, cfg.pairs_per_volume, cfg.all_scales) == ("bn", "relu", 16, False)
    # The optimizer the trainer builds from it (width shrunk and one epoch of steps counted, to stay small).
    small = PretrainConfig.from_name("official", data="unused", out=str(tmp_path / "run"), width=2,
                                     pairs_per_volume=16)
    trainer = Pretrainer(small, phantom_volumes)
    opt = trainer.optimizer
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (1e-3, 0.9, 1e-4, False)
    assert trainer.steps_per_epoch == 1 and trainer.total_steps == 240  # 2 scans x 16 pairs / 32 per step
    assert trainer.loss_fn.total_epochs == 240


def test_compiled_run_updates_exactly_the_parameters_eager_updates(tmp_path, phantom_volumes):
    """Heads of the scales a step's loss does not read get no gradient in eager, so SGD leaves them alone; a compiled
    forward must not move them either (AOTAutograd would hand them zero gradients that weight decay and momentum
    still apply). Three steps with different scale draws, then the same parameters in both runs."""
    torch.manual_seed(0)
    initial = params(NonSkipUNet3D(width=2))  # the tiny runs' initial weights (same seed, same construction)
    finals = {}
    for compiled in (False, True):
        trainer = Pretrainer(tiny(tmp_path, f"c{int(compiled)}", steps=3, compile=compiled, pairs_per_volume=3),
                             phantom_volumes)
        trainer.run()
        finals[compiled] = params(trainer.model)
    unmoved = [name for name, value in finals[False].items() if torch.equal(value, initial[name])]
    assert any("deep_supervision_head" in name for name in unmoved)  # the draws left some head unread
    for name in unmoved:
        assert torch.equal(finals[True][name], initial[name]), f"{name} moved under torch.compile"
    # Otherwise the runs agree up to the compiled kernels' rounding (measured: 2e-4 at most, in a running variance).
    for name, value in finals[False].items():
        torch.testing.assert_close(finals[True][name], value, rtol=1e-3, atol=1e-3, msg=name)


def test_fused_sgd_takes_parameters_whose_first_gradient_comes_late():
    """Fused SGD fails when a parameter gets its first gradient after others have momentum buffers (torch expects
    all or none); PCRLv2's unread heads make that the normal case. Primed buffers fix it and change no update."""
    from pcrlv2_fast.train.optim import build_optimizer

    results = {}
    for impl in ("fused", "foreach"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
        opt = build_optimizer(PretrainConfig(optim_impl=impl, lr=0.1), model)
        g = torch.Generator().manual_seed(1)
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            x = torch.randn(4, 3, generator=g)
            (model(x).sum() if step else model[0](x).sum()).backward()  # step 0: the second layer gets no gradient
            opt.step()
        results[impl] = [p.detach().clone() for p in model.parameters()]
    for fused, foreach in zip(results["fused"], results["foreach"]):
        torch.testing.assert_close(fused, foreach, rtol=1e-6, atol=1e-7)
    plain = torch.optim.SGD([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))], lr=0.1,
                            momentum=0.9, fused=True)
    plain.param_groups[0]["params"][0].grad = torch.ones(2)
    plain.step()
    for p in plain.param_groups[0]["params"]:
        p.grad = torch.ones(2)
    with pytest.raises(TypeError):  # the torch behaviour this guards against: if torch fixes it, drop the priming
        plain.step()
