"""The benchmark harnesses run end to end on tiny settings and write well-formed result rows."""

import json
import subprocess
import sys
from pathlib import Path

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
