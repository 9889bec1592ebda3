"""Training from a preprocessed cache needs only torch, triton, numpy and tqdm (the GPU machine has nothing else):
SimpleITK, MONAI, DALI, TensorBoard and matplotlib are imported where used, and a missing one costs a one-line
notice, never a crash. Checked by running `pretrain` in a process where importing them fails."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("SimpleITK", "monai", "nvidia.dali", "tensorboard", "torch.utils.tensorboard", "matplotlib")

RUNNER = f'''
import importlib.abc
import sys

BLOCKED = {BLOCKED!r}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"No module named {{name!r}} (blocked: a minimal install)")
        return None


sys.meta_path.insert(0, Blocker())
from pcrlv2_fast.cli import main

code = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
print("LEAKED", leaked)
sys.exit(code)
'''


def test_pretrain_from_a_cache_with_only_the_core_packages(tmp_path, phantom_cache):
    runner = tmp_path / "minimal.py"
    runner.write_text(RUNNER)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(runner), "pretrain", "--data", str(phantom_cache), "--out", str(out), "--width", "2",
         "--batch-size", "2", "--steps", "2", "--pairs-per-volume", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LEAKED []" in proc.stdout
    notices = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert any("no TensorBoard" in line for line in notices), proc.stderr[-2000:]
    assert any("no pictures" in line and "matplotlib" in line for line in notices), proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "checkpoint.pt").stat().st_size > 0 and not (out / "restoration.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert "restoration" not in summary["files"]
