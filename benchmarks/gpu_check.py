"""The whole GPU visit in one command (``make gpu-check``): every number a lent H100 should give, time-boxed
(the stages' limits add up to about 8 minutes).

Stages, each a child process with its own time limit, results appended as JSON under ``$OUT`` (when set) or
benchmarks/results/:
1. install in place (``pip install --no-deps --no-build-isolation -e .``: the C++ kernels against this
   machine's torch) and the versions: torch, Triton, CUDA, driver, GPU;
2. ``pcrlv2-fast selftest`` on the device, TF32 off;
3. the per-kernel and conv-block benchmarks at the official model's shapes against torch/cuDNN, with the
   chooser's decisions and each row's roofline prediction;
4. the train step at batch 32, width 32: eager fp32, eager bf16 autocast (the fair baseline), the engine
   (bf16 + channels-last), + torch.compile, + Triton kernels: s/step, samples/s, TFLOP/s, MFU against the H100's
   989 TFLOP/s, peak memory, and the step's roofline floor;
5. 200 real ``pretrain`` steps from the bundled cache (``make gpu-bundle``) at batch 32: samples/s, data-wait
   share, memory;
6. ``pcrlv2-fast profile`` of the engine's step (bf16, channels-last) on the bundled cache: phases, MFU,
   per-layer table and trace;
7. the 2D branch: its views built on the GPU against the CPU path, and its step (batch 32) against eager fp32;
8. one summary table, predictions beside measurements.
``--device cpu`` is the dry run at tiny sizes (tested in CI, so the script cannot rot).

Usage: python benchmarks/gpu_check.py [--device cuda|cpu] [--bundle gpu_bundle] [--skip-install]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import H100, RESULTS, ROOT, roofline_ms  # noqa: E402

TARGET_SAMPLES_PER_S = 330  # DESIGN.md: the official recipe in <= 2 GPU-hours


def sizes(device: str) -> dict:
    if device == "cpu":  # the dry run: every stage, tiny
        return {"batch": 2, "width": 2, "step_steps": 1, "step_warmup": 0, "pretrain_steps": 2, "profile_steps": 1}
    return {"batch": 32, "width": 32, "step_steps": 3, "step_warmup": 1, "pretrain_steps": 200, "profile_steps": 10}


class Visit:
    def __init__(self, device: str, out: Path, bundle: Path):
        self.device, self.out, self.bundle = device, out, bundle
        self.size = sizes(device)
        self.stages: list[dict] = []
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        commit = bundle / "commit.json"
        if commit.exists():  # a copy of the tree without .git: the bundle knows the commit
            state = json.loads(commit.read_text())
            self.env.setdefault("PCRLV2_COMMIT", str(state.get("commit")))
            self.env.setdefault("PCRLV2_DIRTY", "1" if state.get("dirty") else "0")

    def run(self, name: str, cmd: list[str], seconds: int) -> dict:
        """Run one stage under its time limit (the H100 budget; four times that for the CPU dry run, whose
        interpreter and CPU convolutions are slower at any size); its output is kept in OUT/<name>.log."""
        seconds = seconds * (4 if self.device == "cpu" else 1)
        t0 = time.perf_counter()
        print(f"== {name} (limit {seconds} s): {' '.join(cmd)}", flush=True)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=seconds)
            status, text = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            status = f"timed out after {seconds} s"
            text = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        (self.out / f"{name}.log").write_text(text)
        print(text[-3000:], flush=True)
        stage = {"stage": name, "status": status, "seconds": round(time.perf_counter() - t0, 1)}
        self.stages.append(stage)
        return stage

    def py(self, *args: str) -> list[str]:
        return [sys.executable, *args]


def stage_versions(visit: Visit, skip_install: bool) -> None:
    if not skip_install:
        visit.run("install", visit.py("-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."), 75)
    code = ("import json, platform, torch, triton; d = {'torch': torch.__version__, 'triton': triton.__version__, "
            "'cuda': torch.version.cuda, 'python': platform.python_version()}\n"
            "if torch.cuda.is_available():\n"
            "    d['gpu'] = torch.cuda.get_device_name(0); d['capability'] = torch.cuda.get_device_capability(0)\n"
            "print(json.dumps(d))")
    visit.run("versions", visit.py("-c", code), 20)
    visit.run("nvidia-smi", ["nvidia-smi"] if visit.device == "cuda" else ["true"], 10)


def stage_selftest(visit: Visit) -> None:
    visit.run("selftest", visit.py("-m", "pcrlv2_fast", "selftest", "--device", visit.device, "--json"), 45)


def stage_kernels(visit: Visit) -> None:
    out = visit.out
    visit.run("kernels", visit.py("benchmarks/benchmark_kernels.py", "--device", visit.device, "--batch-size", "8",
                                  "--no-train-step", "--out", str(out / "kernels.json")), 45)
    visit.run("conv3d_block", visit.py("benchmarks/benchmark_conv3d_block.py", "--device", visit.device,
                                       "--out", str(out / "conv3d_block.json")), 45)


def stage_train_step(visit: Visit) -> None:
    """Two stages: the eager baselines and the engine first, then (CUDA) the compiled and the Triton engine, whose
    first steps compile and measure kernels and may run out of their time without costing the first stage's rows."""
    s = visit.size
    common = ["benchmarks/benchmark_train_step.py", "--device", visit.device, "--batch-size", str(s["batch"]),
              "--width", str(s["width"]), "--steps", str(s["step_steps"]), "--warmup", str(s["step_warmup"]),
              "--peak-tflops", str(H100["bf16_tflops"])]
    visit.run("train_step", visit.py(*common, "--baseline-precision", "fp32,bf16",
                                     "--out", str(visit.out / "train_step.json")), 75)
    if visit.device == "cuda":
        visit.run("train_step_fused", visit.py(*common, "--baseline-precision", "bf16", "--compile", "--triton",
                                               "--out", str(visit.out / "train_step_fused.json")), 120)


VIEWS_2D_CHECK = """
import json, numpy as np, torch
from pcrlv2_fast.data.views2d import ViewConfig2D, batched_views, draw_view, stack_params
rng = np.random.default_rng(0)
bank = torch.from_numpy(rng.integers(0, 256, (8, 512, 512), dtype=np.uint8))
index = torch.from_numpy(rng.integers(0, 8, 64))
views = stack_params([draw_view(rng, 512, 512, ViewConfig2D(), True) for _ in range(64)])
cpu = batched_views(bank, 1 / 255, index, views, 224, gather=False)
dev = batched_views(bank.to("{device}"), 1 / 255, index, views, 224)
diff = max(float((a - b.cpu()).abs().max()) for a, b in zip(cpu, dev))
print(json.dumps({{"views2d_max_abs_diff": diff}}))
assert diff < 1e-3, diff
"""


def stage_2d(visit: Visit) -> None:
    """The 2D branch: its views built on the device against the CPU path, and its step against eager fp32."""
    s = visit.size
    visit.run("views_2d", visit.py("-c", VIEWS_2D_CHECK.format(device=visit.device)), 20)
    visit.run("train_step_2d", visit.py("benchmarks/benchmark_train_step_2d.py", "--device", visit.device,
                                        "--batch-size", str(s["batch"]), "--steps", str(s["step_steps"]),
                                        "--warmup", str(max(1, s["step_warmup"])),
                                        "--out", str(visit.out / "train_step_2d.json")), 60)


def stage_pretrain(visit: Visit) -> None:
    s = visit.size
    cache = visit.bundle / "cache"
    if not cache.exists():
        visit.stages.append({"stage": "pretrain", "status": f"no bundle at {cache} (make gpu-bundle)", "seconds": 0})
        return
    visit.run("pretrain", visit.py(
        "-m", "pcrlv2_fast", "pretrain", "--data", str(cache), "--out", str(visit.out / "pretrain"), "--steps",
        str(s["pretrain_steps"]), "--batch-size", str(s["batch"]), "--width", str(s["width"]), "--precision", "bf16",
        "--channels-last", "--device", visit.device, "--no-pictures", "--no-tensorboard", "--overwrite"), 90)


def stage_profile(visit: Visit) -> None:
    s = visit.size
    cache = visit.bundle / "cache"
    source = ["--data", str(cache)] if cache.exists() else ["--synthetic"]
    options = ["--steps", str(s["profile_steps"]), "--warmup", str(max(1, s["step_warmup"])), "--layer-steps", "2",
               "--batch-size", str(s["batch"]), "--width", str(s["width"]), "--precision", "bf16", "--channels-last",
               "--device", visit.device, "--no-progress"]
    visit.run("profile", visit.py("-m", "pcrlv2_fast", "profile", *source, "--out", str(visit.out / "profile"),
                                  *options), 60)


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def summary(visit: Visit) -> dict:
    """The measured figures with the predictions beside them."""
    from benchmark_train_step import flops_per_sample

    out, s = visit.out, visit.size
    floor_ms = roofline_ms(flop=flops_per_sample(s["width"]) * s["batch"])
    result = {"device": visit.device, "date": datetime.date.today().isoformat(), "stages": visit.stages,
              "predicted": {"train_step_floor_ms": floor_ms,
                            "samples_per_s_at_100pct_mfu": s["batch"] / (floor_ms / 1e3),
                            "target_samples_per_s": TARGET_SAMPLES_PER_S}}
    rows = (_load(out / "train_step.json") or []) + [r for r in _load(out / "train_step_fused.json") or []
                                                     if r["provider"] in ("engine_compile", "engine_triton")]
    result["train_step"] = [{k: r.get(k) for k in ("provider", "precision", "compile", "kernels", "s_per_step",
                                                   "samples_per_s", "tflops", "mfu", "peak_mem_gb")} for r in rows]
    result["train_step_2d"] = [{k: r.get(k) for k in ("provider", "precision", "s_per_step", "samples_per_s",
                                                      "speedup_vs_eager_fp32")}
                               for r in _load(out / "train_step_2d.json") or []]
    prof = _load(out / "profile" / "profile.json")
    if prof:
        result["profile"] = {"step_s": prof["step"]["mean_s"], "mfu": prof["throughput"]["mfu"],
                             "phases": {k: v["share"] for k, v in prof["phases"].items()},
                             "phase_check": prof["phase_check"]["ok"]}
    pre = _load(out / "pretrain" / "summary.json")
    metrics = out / "pretrain" / "metrics.jsonl"
    if pre and metrics.exists():
        lines = [json.loads(x) for x in metrics.read_text().splitlines()]
        result["pretrain"] = {"steps": pre["steps"], "samples_per_s": pre["samples_per_s"],
                              "data_wait": sum(r["data_wait"] for r in lines) / len(lines),
                              "gpu_mem_gb": max((r.get("gpu_mem_gb", 0.0) for r in lines), default=None)}
    return result


def print_summary(result: dict) -> None:
    print("\n== summary")
    for st in result["stages"]:
        print(f"  {st['stage']:<14} {st['status']:<28} {st['seconds']:>7.1f} s")
    pred = result["predicted"]
    print(f"  train step floor (FLOPs at {H100['bf16_tflops']:.0f} TFLOP/s): {pred['train_step_floor_ms']:.1f} ms "
          f"= {pred['samples_per_s_at_100pct_mfu']:.0f} samples/s; target {pred['target_samples_per_s']} samples/s")
    for r in result["train_step"]:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        print(f"  {r['provider']:<16} {r['s_per_step']:.4f} s/step {r['samples_per_s']:8.1f} samples/s MFU {mfu}")
    for r in result.get("train_step_2d", []):
        print(f"  2D {r['provider']:<13} {r['s_per_step']:.4f} s/step {r['samples_per_s']:8.1f} samples/s "
              f"{r['speedup_vs_eager_fp32']:.2f}x")
    if "profile" in result:
        p = result["profile"]
        shares = ", ".join(f"{k} {v:.0%}" for k, v in p["phases"].items())
        mfu = f"{p['mfu']:.1%}" if p.get("mfu") is not None else "-"
        print(f"  profile: {p['step_s'] * 1e3:.1f} ms/step, MFU {mfu}; {shares}")
    if "pretrain" in result:
        p = result["pretrain"]
        print(f"  pretrain: {p['steps']} steps, {p['samples_per_s']} samples/s, data wait {p['data_wait']:.1%}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--bundle", default=str(ROOT / "gpu_bundle"))
    p.add_argument("--out", default=os.environ.get("OUT"), help="result folder (default $OUT, else a dated folder "
                                                                 "under benchmarks/results)")
    p.add_argument("--skip-install", action="store_true")
    args = p.parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    out = Path(args.out) if args.out else RESULTS / f"gpu_check-{args.device}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    visit = Visit(args.device, out, Path(args.bundle))
    stage_versions(visit, args.skip_install)
    stage_selftest(visit)
    stage_kernels(visit)
    stage_train_step(visit)
    stage_pretrain(visit)
    stage_profile(visit)
    stage_2d(visit)
    result = summary(visit)
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    print_summary(result)
    return 0 if all(st["status"] == "ok" for st in visit.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
