"""The sm_90 compile report: every kernel configuration the engine launches for the official model compiles for
Hopper without spills and within shared memory (Triton compiles for a GPU target without a GPU).

The full report (all precisions) is `pcrlv2-fast selftest --arch sm_90`; this test compiles the bf16 set."""

import json
import os
import subprocess
import sys

import pytest

from tests import requirements

requirements.importorskip("triton", "triton")

from pcrlv2_fast import compile_report as cr  # noqa: E402

KERNELS = {"_conv3d_fwd_kernel", "_conv3d_wgrad_kernel", "_colsum_kernel", "_stats_combine_kernel", "_stats_kernel",
           "_combine_kernel", "_apply_kernel", "_bwd_reduce_kernel", "_sum_kernel", "_bwd_dx_kernel",
           "_restoration_fwd_kernel", "_restoration_bwd_kernel", "_cosine_fwd_kernel", "_cosine_bwd_kernel"}


def test_bf16_configurations_compile_for_sm90_without_spills(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pcrlv2_fast", "selftest", "--arch", "sm_90", "--dtypes", "bf16",
                           "--json-out", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["arch"] == "sm_90" and {r["kernel"] for r in rows} == KERNELS
    for r in rows:
        assert r["ok"] and r["regs"] and r["spill_bytes"] == 0 and r["shared"] <= 232448, r
        assert 0 < r["warps_per_sm"] <= 64
    assert "all configurations passed" in proc.stdout
    # Both conv directions at the official model's 17 layer shapes, global and local views.
    assert {r["op"].split(" (")[0] for r in rows} >= {"conv3d_block fwd", "conv3d_block bwd", "bn_act3d apply",
                                                      "bn_act3d bwd", "restoration_loss fwd all scales"}


def test_official_layers_and_signatures():
    layers = cr.official_conv_layers()
    assert len(layers) == 2 * 17  # 17 conv blocks, on global and on local views
    assert ((32, 1, 64, 64, 32), 32) in layers and ((192, 256, 2, 2, 2), 512) in layers
    assert cr._arg_type(3) == "i32" and cr._arg_type(2**31) == "i64" and cr._arg_type(0.5) == "fp32"


def test_rows_fail_on_spills_and_shared_memory():
    ok = cr.judge(cr.Row("k", "op", "cfg", regs=128, spill_bytes=0, shared=1024, warps_per_sm=16), "sm_90")
    assert ok.ok and ok.note == ""
    spill = cr.judge(cr.Row("k", "op", "cfg", regs=255, spill_bytes=64, shared=0, warps_per_sm=8), "sm_90")
    assert not spill.ok and "spills 64 B" in spill.note
    big = cr.judge(cr.Row("k", "op", "cfg", regs=64, spill_bytes=0, shared=240000, warps_per_sm=4), "sm_90")
    assert not big.ok and "shared memory" in big.note
    assert cr.resident_warps(255, 16384, 4, "sm_90") == 8 and cr.resident_warps(32, 0, 4, "sm_90") == 64
    with pytest.raises(ValueError, match="unknown arch"):
        cr.run("sm_75")
