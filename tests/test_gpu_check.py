"""The GPU visit's one command, dry-run on the CPU at tiny sizes so that it cannot rot: the bundle is built from
the shared data, every stage runs and the summary holds the measured figures with the predictions beside them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bundle_and_check_dry_run(tmp_path, shared_data):
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    made = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bundle.py"), "--out", str(bundle), "--data",
                           str(shared_data)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    index = json.loads((bundle / "cache" / "index.json").read_text())
    assert [s["name"] for s in index["scans"]] == ["aorta_ct_cropped", "pulmonary_ct_cropped"]
    assert json.loads((bundle / "commit.json").read_text())["commit"]
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < 40 * 2**20

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--skip-install", "--bundle", str(bundle), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s["status"] for s in summary["stages"]}
    assert set(stages) == {"versions", "nvidia-smi", "selftest", "kernels", "conv3d_block", "train_step", "pretrain",
                           "profile", "views_2d", "train_step_2d"}
    assert set(stages.values()) == {"ok"}
    assert [r["provider"] for r in summary["train_step"]] == ["eager_fp32", "eager_bf16", "engine"]
    assert all(r["mfu"] is not None and r["s_per_step"] > 0 for r in summary["train_step"])
    assert summary["pretrain"]["steps"] == 2 and 0 <= summary["pretrain"]["data_wait"] <= 1
    assert summary["profile"]["phase_check"] and summary["profile"]["step_s"] > 0
    assert [r["provider"] for r in summary["train_step_2d"]] == ["eager_fp32", "engine_fp32", "engine"]
    assert summary["predicted"]["train_step_floor_ms"] > 0 and summary["predicted"]["target_samples_per_s"] == 330
    assert "== summary" in proc.stdout and (out / "selftest.log").read_text().startswith("[")
