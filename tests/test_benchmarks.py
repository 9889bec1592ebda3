"""The benchmark harnesses run end to end on tiny settings and write well-formed result rows."""

import json
import subprocess
import sys
from pathlib import Path

from tests import requirements

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark_train_step.py"), "--width", "2", "--steps", "1",
         "--warmup", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["provider"] for r in rows] == ["eager_fp32", "engine"]
    for r in rows:
        assert r["s_per_step"] > 0 and r["samples_per_s"] > 0 and r["torch"] and r["device"] and r["date"]
        # 2 global + 6 local views, forward + backward, counted at width 2
        assert 1.0 < r["gflop_per_sample"] < 20.0
    assert rows[0]["speedup_vs_eager_fp32"] == 1.0
    assert "speed-up" in proc.stdout


def test_data_benchmark_whole_device_mode_writes_rows(tmp_path, phantom_volumes):
    """The --device cuda path of benchmark_data (whole-device samples/s of each backend), run on the CPU."""
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import benchmark_data
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from pcrlv2_fast.data import CropConfig, native

    out = tmp_path / "rows.json"
    benchmark_data.gpu_main(argparse.Namespace(device="cpu", samples=2, batch=2, out=str(out)), phantom_volumes,
                            CropConfig())
    rows = json.loads(out.read_text())
    providers = {r["provider"] for r in rows}
    assert "torch" in providers and ("native" in providers) == native.available()
    for r in rows:
        assert r["samples_per_s"] > 0 and r["samples"] == 2 and r["batch"] == 2


def test_gpu_only_benchmarks_exit_cleanly_on_cpu():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark_conv3d_block.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "GPU only" in proc.stdout


def test_profile_benchmark_writes_rows_the_readme_renders(tmp_path):
    out = tmp_path / "profile-cpu-2026-01-01.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark_profile.py"), "--width", "2", "--steps", "1",
         "--warmup", "0", "--compare-steps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["kind"] for r in rows] == ["profile", "compare"]
    assert rows[0]["phase_check"]["ok"] and rows[0]["layers"] and rows[0]["command"].startswith("python benchmarks/")
    assert len(rows[1]["rows"]) == 4 and rows[1]["rows"][0]["baseline"]  # fp32 baseline + 3 more of the 2x2 matrix
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    text = report.render_profile(rows, out)
    assert "MFU" in text and "(baseline)" in text and "Fastest" in text


def test_end_to_end_benchmark_writes_rows_the_readme_renders(tmp_path, phantom_dir):
    requirements.importorskip("torchio", "torchio")
    requirements.importorskip("skimage", "skimage")
    out = tmp_path / "end_to_end-cpu-2026-01-01.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark_end_to_end.py"), "--data", str(phantom_dir),
         "--width", "2", "--steps", "1", "--workers", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["provider"] for r in rows] == ["official", "engine"]
    assert all(r["s_per_step"] > 0 for r in rows) and rows[0]["speedup_vs_official"] == 1.0
    assert "engine / official" in proc.stdout
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    assert "vs official" in report.render_end_to_end(rows, out)


def _report():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    return report


def test_2d_data_and_step_benchmarks_write_rows_the_readme_renders(tmp_path, shared_data):
    data_out, step_out = tmp_path / "data2d-cpu-2026-01-01.json", tmp_path / "train_step2d-cpu-2026-01-01.json"
    for script, args, out in [("benchmark_data_2d.py", ["--data", str(shared_data / "nih-chestxray-1000"), "--images",
                                                        "4", "--samples", "2", "--batch", "2"], data_out),
                              ("benchmark_train_step_2d.py", ["--batch-size", "2", "--steps", "1", "--warmup", "0"],
                               step_out)]:
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    data_rows, step_rows = json.loads(data_out.read_text()), json.loads(step_out.read_text())
    assert [r["provider"] for r in data_rows] == ["official_file", "official_memory", "dataset", "torch", "dali"]
    assert data_rows[0]["speedup_vs_official"] == 1.0 and all(r["s_per_sample"] > 0 for r in data_rows)
    assert [r["provider"] for r in step_rows] == ["eager_fp32", "engine_fp32", "engine"]
    assert step_rows[2]["precision"] == "bf16" and step_rows[2]["channels_last"]
    report = _report()
    assert "vs official_file" in report.render_data2d(data_rows, data_out)
    assert "vs eager fp32" in report.render_train_step2d(step_rows, step_out)


def test_xray_benchmark_quick_writes_rows_the_readme_renders(tmp_path, shared_data):
    out = tmp_path / "xray-cpu-2026-01-01.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark_xray.py"), "--data",
         str(shared_data / "nih-chestxray-1000"), "--out", str(tmp_path / "run"), "--quick", "--no-progress",
         "--results", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["kind"] for r in rows] == ["pretrain", *["finetune"] * 4, "summary"]
    assert rows[0]["images"] + rows[0]["split"]["val"] > 0 and rows[0]["split"]["test"] > 100
    assert [(r["mode"], r["init"]) for r in rows[1:5]] == [("full", "random"), ("full", "pcrlv2"),
                                                          ("linear", "random"), ("linear", "pcrlv2")]
    assert set(rows[-1]["by_fraction"]) == {"full 1", "linear 1"}
    assert "PCRLv2 init" in _report().render_xray(rows, out)
