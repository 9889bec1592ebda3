"""``pcrlv2-fast profile`` on the CPU: phases that add up to the step, per-layer FLOPs that add up to the model's
count, the comparison matrix, clear errors before anything runs, and ``pretrain --profile-steps``."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from pcrlv2_fast.cli import main as cli_main
from pcrlv2_fast.models import NonSkipUNet2D, NonSkipUNet3D
from pcrlv2_fast.profiler import parse_compare
from pcrlv2_fast.profiler.flops import layer_flops, model_flops, reported_layers, step_passes
from pcrlv2_fast.profiler.peaks import cpu_peak, gpu_peak
from pcrlv2_fast.train.phases import PHASES, PhaseTimer

TINY = ["--preset", "tiny", "--width", "2", "--batch-size", "2", "--device", "cpu", "--no-progress"]


# ------------------------------------------------------------------------------------------------ FLOPs
@pytest.mark.parametrize("width,batch", [(2, 2), (3, 1)])
def test_layer_flops_add_up_to_the_model_count(width, batch):
    model = NonSkipUNet3D(width=width)
    passes = step_passes(batch, (32, 32, 16), (16, 16, 16), 3)
    layers = layer_flops(model, passes)
    assert set(layers) == {name for name, _ in reported_layers(model)}
    assert sum(layers.values()) == model_flops(model, passes) > 0


def test_layer_flops_of_the_first_and_an_inner_block():
    model = NonSkipUNet3D(width=2)
    shape = (2, 1, 16, 16, 8)
    layers = layer_flops(model, [(shape, False)])
    voxels = 2 * 16 * 16 * 8
    # down_tr64.ops.0: conv 1 -> 2 channels, 3^3 taps: forward, and a weight gradient only (its input, the
    # views, needs none).
    first = 2 * voxels * 1 * 2 * 27
    assert layers["down_tr64.ops.0"] == first * 2
    # down_tr64.ops.1: conv 2 -> 4: forward, input and weight gradients.
    assert layers["down_tr64.ops.1"] == 2 * voxels * 2 * 4 * 27 * 3
    # The local views' deep-supervision heads get no gradient: forward only.
    local = layer_flops(model, [((4, 1, 16, 16, 16), True)])
    head_forward = 2 * 4 * 16**3 * 4 * 1 * 27  # up_tr64's head: 4 -> 1 channels at full resolution
    assert local["up_tr64.deep_supervision_head"] == head_forward


def test_fused_models_count_as_their_plain_architecture():
    plain, fused = NonSkipUNet3D(width=2), NonSkipUNet3D(width=2, kernels="triton")
    passes = step_passes(1, (16, 16, 8), (8, 8, 8), 2)
    assert layer_flops(fused, passes) == layer_flops(plain, passes)
    assert [n for n, _ in reported_layers(fused)] == [n for n, _ in reported_layers(plain)]


# ------------------------------------------------------------------------------------------------ peaks, timer
def test_device_peaks():
    assert gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert gpu_peak("NVIDIA H100 PCIe", "bf16") == 756.0
    assert gpu_peak("NVIDIA H200", "fp32") == 66.9
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert gpu_peak("NVIDIA L4", "fp16") == 121.0 and gpu_peak("NVIDIA L40S", "bf16") == 362.1
    assert gpu_peak("Some Future GPU", "bf16") is None
    assert 0 < cpu_peak("fp32", seconds=0.02, sizes=(64, 128)) < 100


def test_phase_timer_adds_phases_of_one_name():
    timer = PhaseTimer(torch.device("cpu"))
    for name in ("optimizer", "backward", "optimizer"):
        with timer(name):
            sum(range(20000))
    phases = timer.collect()
    assert set(phases) == {"optimizer", "backward"} and all(v > 0 for v in phases.values())
    assert timer.collect() == {}


# ------------------------------------------------------------------------------------------------ the command
def test_profile_synthetic_phases_add_up(tmp_path, capsys):
    out = tmp_path / "p"
    assert cli_main(["profile", "--synthetic", "--out", str(out), "--steps", "3", "--warmup", "1",
                     "--layer-steps", "1", *TINY]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "profile.json").read_text())
    # Every phase of the step was timed, and together they are the measured step.
    assert {"data_wait", "h2d", "forward_global", "forward_local", "loss", "backward", "optimizer"} <= set(
        result["phases"]) <= set(PHASES)
    assert result["phase_check"]["ok"] and result["phase_check"]["max_gap"] <= 0.05
    total_share = sum(p["share"] for p in result["phases"].values())
    assert abs(total_share - 1) <= 0.05
    # The per-layer FLOPs are the model's FLOPs; every reported layer has a row and was timed.
    t = result["throughput"]
    assert sum(r["flops"] for r in result["layers"]) == t["model_flops_per_step"]
    assert len(result["layers"]) == len(reported_layers(NonSkipUNet3D(width=2)))
    assert all(r["fwd_s"] > 0 for r in result["layers"])
    assert t["samples_per_s"] == pytest.approx(2 / result["step"]["mean_s"])
    assert t["peak_tflops"] > 0 and 0 < t["mfu"] and math.isclose(t["mfu"], t["achieved_tflops"] / t["peak_tflops"])
    assert result["top_kernels"] and result["memory"]["peak_rss_gb"] > 0
    trace = json.loads((out / "trace.pt.trace.json").read_text())
    assert any(str(e.get("name", "")).startswith("layer:") for e in trace["traceEvents"])
    assert (out / "profile.png").stat().st_size > 10_000
    assert "phases add up to the step" in printed and "MFU" in printed


def test_profile_from_a_cache(tmp_path, phantom_cache):
    out = tmp_path / "p"
    assert cli_main(["profile", "--data", str(phantom_cache), "--out", str(out), "--steps", "2", "--warmup", "0",
                     "--layer-steps", "0", "--loader", "torch", *TINY]) == 0
    result = json.loads((out / "profile.json").read_text())
    assert result["phase_check"]["ok"] and result["config"].endswith("torch torch")
    assert result["layers"] == [] and result["trace"] is None


def test_profile_with_prefetch_times_the_queue_wait(tmp_path):
    # Batches built ahead in the prefetcher's thread: the step waits for the queue (data_wait), the copy to the
    # device happens inside the producer (no h2d phase), and the phases still add up to the step.
    out = tmp_path / "p"
    assert cli_main(["profile", "--synthetic", "--out", str(out), "--steps", "3", "--warmup", "1",
                     "--layer-steps", "0", "--prefetch", "2", *TINY]) == 0
    result = json.loads((out / "profile.json").read_text())
    assert "data_wait" in result["phases"] and "h2d" not in result["phases"]
    assert result["phase_check"]["ok"]


def test_timed_run_feeds_the_same_batches_with_and_without_prefetch(tmp_path):
    from pcrlv2_fast.data.synthetic import synthetic_volumes
    from pcrlv2_fast.profiler.run import TimedRun
    from pcrlv2_fast.train import PretrainConfig

    volumes = synthetic_volumes()
    seen = {}
    for depth in (0, 2):
        cfg = PretrainConfig.from_name("tiny", width=2, batch_size=2, device="cpu", prefetch=depth, out=str(tmp_path),
                                       tensorboard=False, pictures=False)
        run = TimedRun(cfg, volumes)
        try:
            batches = [run._next_micro() for _ in range(3)]
        finally:
            run.close()
        seen[depth] = batches
    for (e0, b0), (e2, b2) in zip(seen[0], seen[2], strict=True):
        assert e0 == e2 and all(torch.equal(b0[k], b2[k]) for k in ("x1", "x2", "gt", "loc"))


def test_timed_run_wraps_the_epoch_of_the_schedules(tmp_path):
    from pcrlv2_fast.data.synthetic import synthetic_volumes
    from pcrlv2_fast.profiler.run import TimedRun
    from pcrlv2_fast.train import PretrainConfig

    cfg = PretrainConfig.from_name("tiny", width=2, batch_size=2, steps=6, device="cpu", out=str(tmp_path),
                                   tensorboard=False, pictures=False)
    run = TimedRun(cfg, synthetic_volumes())
    assert run.trainer.total_epochs > 1
    try:
        epochs = [epoch for epoch, _ in itertools.islice(run._host_batches(), 3 * run.trainer.steps_per_epoch
                                                          * run.trainer.total_epochs)]
    finally:
        run.close()
    # A profile longer than the run starts the schedules' epochs again instead of running past the last one.
    assert set(epochs) == set(range(run.trainer.total_epochs))


def test_compare_two_configurations(tmp_path, capsys):
    out = tmp_path / "c"
    assert cli_main(["profile", "--synthetic", "--out", str(out), "--steps", "1", "--warmup", "0",
                     "--compare", "precision=fp32,bf16", *TINY]) == 0
    compare = json.loads((out / "profile.json").read_text())["compare"]
    rows = compare["rows"]
    # The fp32 entry of the matrix is the official-equivalent baseline itself: two configurations in all.
    assert [(r["config"].split()[0], r["baseline"]) for r in rows] == [("fp32", True), ("bf16", False)]
    assert rows[0]["speedup"] == 1.0 and all(r["samples_per_s"] > 0 for r in rows)
    assert compare["fastest"] in {r["config"] for r in rows}
    assert (out / "compare.png").stat().st_size > 5_000
    assert "fastest:" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--compare", "precison=fp32"], "AXIS one of"),
    (["--compare", "precision=fp64"], "precision takes values from"),
    (["--compare", "channels_last=yes"], "takes 0 or 1"),
    (["--compare", "precision=tf32"], "tf32 is fp32 on the CPU"),
    (["--compare", "kernels=triton"], "kernels triton needs a CUDA device"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_options_fail_before_anything_runs(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "bad"
    assert cli_main(["profile", "--synthetic", "--out", str(out), *TINY, *args]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "profile.json").exists()


def test_parse_compare():
    assert parse_compare(["precision=fp32,bf16", "compile=0,1", "prefetch=0,2"]) == {
        "precision": ["fp32", "bf16"], "compile": [False, True], "prefetch": [0, 2]}
    with pytest.raises(ValueError, match="whole numbers"):
        parse_compare(["prefetch=-1"])


# ------------------------------------------------------------------------------------------------ pretrain
def test_pretrain_profile_steps_writes_a_trace(tmp_path, phantom_cache):
    out = tmp_path / "run"
    assert cli_main(["pretrain", "--data", str(phantom_cache), "--out", str(out), "--preset", "tiny", "--steps", "3",
                     "--profile-steps", "2:2", "--no-tensorboard"]) == 0
    # The name TensorBoard's profiler plugin looks for (<worker>.pt.trace.json), in the run's folder.
    events = json.loads((out / "trace.pt.trace.json").read_text())["traceEvents"]
    assert any("convolution" in str(e.get("name", "")) for e in events)
    assert json.loads((out / "summary.json").read_text())["files"]["trace"] == str(out / "trace.pt.trace.json")
    assert cli_main(["pretrain", "--data", str(phantom_cache), "--out", str(out), "--preset", "tiny",
                     "--profile-steps", "3:2"]) == 2


def test_2d_layer_flops_add_up_and_cover_every_layer():
    model = NonSkipUNet2D()
    passes = step_passes(2, (64, 64), (32, 32), 2, channels=3)
    layers = layer_flops(model, passes)
    assert sum(layers.values()) == model_flops(model, passes) > 0
    names = [name for name, _ in reported_layers(model)]
    assert len(names) == 1 + 8 + 5 * 4 + 1  # stem, 8 basic blocks, 4 parts per decoder block, output conv
    assert all(layers[n] > 0 for n in names)
    # The local views skip the deep-supervision heads: a local pass counts none of their FLOPs.
    local = layer_flops(model, [((4, 3, 32, 32), True)])
    assert all(local[n] == 0 for n in names if n.endswith("deep_supervision_head") or n == "model.segmentation_head")


def test_profile_2d_synthetic(tmp_path):
    out = tmp_path / "p2"
    assert cli_main(["profile", "--synthetic", "--dims", "2", "--out", str(out), "--steps", "1", "--warmup", "0",
                     "--layer-steps", "1", "--batch-size", "2", "--device", "cpu", "--no-progress"]) == 0
    result = json.loads((out / "profile.json").read_text())
    assert result["phase_check"]["ok"]
    assert sum(r["flops"] for r in result["layers"]) == result["throughput"]["model_flops_per_step"]
    assert result["layers"][0]["layer"].startswith("model.")
