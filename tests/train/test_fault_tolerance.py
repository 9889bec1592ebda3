"""Fault tolerance: a run stopped by SIGTERM or killed by SIGKILL resumes to the parameters of an uninterrupted run,
unreadable checkpoints are passed over, and skipped steps (fp16 overflow, non-finite loss or gradient) change
nothing but counters."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pcrlv2_fast.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    numbered_checkpoints,
    save_rotating_checkpoint,
)
from pcrlv2_fast.train import PretrainConfig, Pretrainer
from pcrlv2_fast.train.metrics import NonFiniteLossError
from tests import requirements
from tests.helpers import file_size_limit

N = 6  # steps: 4 per epoch (2 scans x 4 pairs, batch 2), so the runs cross an epoch and its lr change
SETTINGS = dict(batch_size=2, pairs_per_volume=4, steps=N, lr=0.01, device="cpu")


def config(out, **kw):
    return PretrainConfig.from_name("tiny", data="unused", out=str(out), **{**SETTINGS, **kw})


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same(actual, expected):
    for k, v in expected.items():
        torch.testing.assert_close(actual[k], v, rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_volumes):
    """An uninterrupted run (one thread, as the subprocesses below) and its final parameters."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("uninterrupted")
        trainer = Pretrainer(config(out), cache_volumes)
        trainer.run()
        return out, params(trainer.model)
    finally:
        torch.set_num_threads(threads)


def start_cli(out, phantom_cache, *extra):
    args = [sys.executable, "-m", "pcrlv2_fast", "pretrain", "--data", str(phantom_cache), "--out", str(out),
            "--preset", "tiny", "--no-pictures"]
    for key, value in SETTINGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    out.mkdir(parents=True)
    log = open(out.parent / f"{out.name}.stderr", "w")  # a file: a full pipe would block the child
    proc = subprocess.Popen([*args, *extra], stdout=subprocess.DEVNULL, stderr=log,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, out.parent / f"{out.name}.stderr"


def wait_for_steps(proc, out, n, timeout=180.0):
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before step {n}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step {n} within {timeout} s")
        time.sleep(0.02)


def test_uninterrupted_run_logs_tensorboard_and_resolved_config(reference):
    out, _ = reference
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == N and ckpt["config"]["batch_size"] == 2 and ckpt["config"]["steps"] == N
    assert ckpt["resolved"]["world_size"] == 1 and ckpt["resolved"]["optim_impl"] == "foreach"
    assert [s for s, _ in numbered_checkpoints(out)] == [4, 6]  # epoch end and run end, the last 2 kept
    assert os.path.samefile(out / "checkpoint.pt", out / "checkpoint-6.pt")
    requirements.importorskip("tensorboard", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/loss", "loss/loss_restore", "train/lr", "train/grad_norm", "perf/samples_per_s",
            "perf/data_wait"} <= tags
    assert [e.step for e in events.Scalars("loss/loss")] == list(range(1, N + 1))


def test_sigterm_saves_and_exits_cleanly_then_resumes_exactly(tmp_path, phantom_cache, cache_volumes, reference,
                                                              one_thread):
    out = tmp_path / "run"
    proc, log = start_cli(out, phantom_cache)
    wait_for_steps(proc, out, 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
    assert "stopped by SIGTERM" in log.read_text()
    stopped = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= stopped < N
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == "SIGTERM"

    resumed = Pretrainer(config(out, resume="auto"), cache_volumes)
    resumed.run()
    assert resumed.resumed_from == out / "checkpoint.pt" and resumed.step == N
    assert_same(params(resumed.model), reference[1])
    assert steps_logged(out) == list(range(1, N + 1))


def test_sigkill_then_truncated_checkpoint_is_skipped(tmp_path, phantom_cache, cache_volumes, reference, one_thread,
                                                      capsys):
    out = tmp_path / "run"
    proc, _ = start_cli(out, phantom_cache, "--save-every", "1", "--keep-checkpoints", "2")
    wait_for_steps(proc, out, 3)
    proc.kill()
    proc.wait(timeout=60)
    assert len(numbered_checkpoints(out)) >= 2  # 3 when the kill came between a save and the pruning
    latest = out / "checkpoint.pt"
    with open(latest, "r+b") as f:  # truncated in place, as a failing disk or copy would leave it
        f.truncate(latest.stat().st_size // 3)

    resumed = Pretrainer(config(out, resume="auto"), cache_volumes)
    resumed.run()
    assert resumed.skipped_checkpoints[0] == latest
    assert resumed.resumed_from.name.startswith("checkpoint-")
    assert "skipping an unreadable checkpoint" in capsys.readouterr().err
    assert_same(params(resumed.model), reference[1])
    assert steps_logged(out) == list(range(1, N + 1))
    assert not list(out.glob(".*.tmp"))


def test_rotation_and_newest_readable_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 5):
        save_rotating_checkpoint(tmp_path, step, model, opt, keep=2)
    assert [s for s, _ in numbered_checkpoints(tmp_path)] == [3, 4]
    assert find_latest_checkpoint(tmp_path)[1]["step"] == 4
    # A save that stopped before moving checkpoint.pt: the newer numbered file wins.
    save_rotating_checkpoint(tmp_path / "other", 5, model, opt, keep=1)
    os.replace(tmp_path / "other" / "checkpoint-5.pt", tmp_path / "checkpoint-5.pt")
    assert find_latest_checkpoint(tmp_path)[0].name == "checkpoint-5.pt"
    (tmp_path / "checkpoint-5.pt").write_bytes(b"garbage")
    (tmp_path / "checkpoint.pt").unlink()  # replaced by an empty file; checkpoint-4.pt keeps its contents
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    skipped = []
    path, ckpt = find_latest_checkpoint(tmp_path, on_skip=lambda p, e: skipped.append(p.name))
    assert (path.name, ckpt["step"]) == ("checkpoint-4.pt", 4)
    assert skipped == ["checkpoint.pt", "checkpoint-5.pt"]
    # Saving step 3 again (a run resumed from it) drops the later numbered files of the abandoned run.
    save_rotating_checkpoint(tmp_path, 3, model, opt, keep=2)
    assert [s for s, _ in numbered_checkpoints(tmp_path)] == [3]
    assert find_latest_checkpoint(tmp_path / "missing") is None


def test_resume_auto_with_only_unreadable_checkpoints_is_an_error(tmp_path, cache_volumes):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"\x80truncated")
    with pytest.raises(CheckpointError, match="no checkpoint there is readable"):
        Pretrainer(config(tmp_path / "run", resume="auto"), cache_volumes).run()


def record_steps(trainer, snapshots, nan_loss_steps=()):
    """Wrap ``trainer.train_step``: poison the target of the given (0-based) steps, snapshot state after each."""
    original = trainer.train_step

    def step(batch, epoch):
        if trainer.step in nan_loss_steps:
            batch = [dict(b, gt=b["gt"] * float("nan")) for b in batch]
        out = original(batch, epoch)
        snapshots.append(params(trainer.model))
        return out

    trainer.train_step = step


def test_fp16_scaler_skips_exactly_the_overflowing_step(tmp_path, cache_volumes, one_thread):
    """The gradient-scaler path of --precision fp16, with fp32 compute: CPU fp16 autocast of conv3d is very slow,
    and the scaler's decisions do not depend on the autocast dtype."""
    trainer = Pretrainer(config(tmp_path / "run", steps=3), cache_volumes)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.model.out_tr.final_conv.bias.register_hook(lambda g: g * float("inf") if trainer.step == 1 else g)
    snapshots = [params(trainer.model)]
    record_steps(trainer, snapshots)
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skip_reason"] for r in rows] == [None, "fp16_overflow", None]
    assert [r["loss_scale"] for r in rows] == [2.0**10, 2.0**9, 2.0**9]
    assert trainer.skip_counts == {"fp16_overflow": 1} and trainer.nonfinite_streak == 0
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(snapshots, snapshots[1:])]
    assert changed == [True, False, True]  # step 2 keeps parameters and batch-norm running statistics


def test_nonfinite_streak_stops_the_run(tmp_path, cache_volumes, one_thread):
    """Steps 1 and 4 get a NaN target (non-finite loss), step 3 an infinite gradient; step 2 is fine. With
    --max-nonfinite 2 the run saves and stops after step 4."""
    trainer = Pretrainer(config(tmp_path / "run", max_nonfinite=2), cache_volumes)
    trainer.model.out_tr.final_conv.bias.register_hook(lambda g: g * float("inf") if trainer.step == 2 else g)
    snapshots = [params(trainer.model)]
    record_steps(trainer, snapshots, nan_loss_steps=(0, 3))
    with pytest.raises(NonFiniteLossError, match=r"2 steps in a row \(steps 3-4\)"):
        trainer.run()
    assert trainer.skip_counts == {"nonfinite_loss": 2, "nonfinite_grad": 1}
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["nonfinite_streak"] == 2 and ckpt["skipped"] == 3
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(snapshots, snapshots[1:])]
    assert changed == [False, True, False, False]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skip_reason"] for r in rows] == ["nonfinite_loss", None, "nonfinite_grad", "nonfinite_loss"]


def test_fused_optimizer_skips_on_the_device(tmp_path, cache_volumes, one_thread, monkeypatch):
    """With a fused optimizer (CPU here, as on CUDA) a skipped step is a device flag the optimizer reads
    (``found_inf``): no parameter, momentum or running statistic moves (momentum buffers exist from the start:
    see prime_momentum)."""
    from pcrlv2_fast.train import step

    decisions = []
    real = step._device_skip
    monkeypatch.setattr(step, "_device_skip", lambda engine: decisions.append(real(engine)) or decisions[-1])
    trainer = Pretrainer(config(tmp_path / "run", steps=4, optim_impl="fused", max_nonfinite=0), cache_volumes)
    assert all(group["fused"] for group in trainer.optimizer.param_groups)
    snapshots = [params(trainer.model)]
    momenta = []
    record_steps(trainer, snapshots, nan_loss_steps=(0, 2))
    original = trainer.train_step

    def step_and_keep_momenta(batch, epoch):
        out = original(batch, epoch)
        momenta.append([s["momentum_buffer"].clone() for s in trainer.optimizer.state.values()])
        return out

    trainer.train_step = step_and_keep_momenta
    trainer.run()
    assert decisions == [True, True, True, True]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skip_reason"] for r in rows] == ["nonfinite_loss", None, "nonfinite_loss", None]
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(snapshots, snapshots[1:])]
    assert changed == [False, True, False, True]
    assert all(torch.equal(a, b) for a, b in zip(momenta[1], momenta[2]))  # the skipped step kept the momentum
    assert trainer.skip_counts == {"nonfinite_loss": 2}


# ------------------------------------------------------------------------------- full disks, concurrent runs
def test_full_disk_during_a_checkpoint_save_keeps_the_previous_one(tmp_path, phantom_cache, cache_volumes,
                                                                    one_thread):
    out = tmp_path / "run"
    Pretrainer(config(out, steps=2, tensorboard=False, pictures=False), cache_volumes).run()
    before = (out / "checkpoint.pt").read_bytes()
    # A tiny model's checkpoint (~330 kB) exceeds the limit; metrics rows and config.json do not.
    args = [sys.executable, "-m", "pcrlv2_fast", "pretrain", "--data", str(phantom_cache), "--out", str(out),
            "--preset", "tiny", "--no-pictures", "--no-tensorboard", "--resume", "auto", "--save-every", "1"]
    for key, value in {**SETTINGS, "steps": 4}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(100_000),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "checkpoint-3.pt: could not be written" in result.stderr and "checkpoints saved before" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "checkpoint.pt").read_bytes() == before
    path, ckpt = find_latest_checkpoint(out)
    assert ckpt["step"] == 2 and not list(out.glob(".*.tmp"))


def test_a_second_run_at_the_same_out_is_refused(tmp_path, phantom_cache):
    out = tmp_path / "run"
    first, log = start_cli(out, phantom_cache, "--no-tensorboard", "--steps", "1000")
    wait_for_steps(first, out, 1)
    second = subprocess.run([sys.executable, "-m", "pcrlv2_fast", "pretrain", "--data", str(phantom_cache), "--out",
                             str(out), "--preset", "tiny", "--steps", "2", "--overwrite"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert first.poll() is None, "the first run ended before the second one started"
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0, log.read_text()[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"{out}: in use by pretrain (pid {first.pid})" in second.stderr
    # The first run is untouched by the second (which would have cleared the folder): every step logged once, in
    # order, and its checkpoint is its last step's.
    stopped = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert steps_logged(out) == list(range(1, stopped + 1))
