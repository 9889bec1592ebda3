"""``pcrlv2-fast profile``: where a training step's time goes, how far it is from the device's peak, and which
settings are fastest (see README, Profiling); 3D, or the 2D network with ``--dims 2``.

The profile builds the trainer's own run (:class:`~pcrlv2_fast.train.loop.Pretrainer`: data, loader, model,
step) and times its step (:func:`~pcrlv2_fast.train.step.pretrain_step`) phase by phase (train/phases.py),
then runs a few more steps under ``torch.profiler`` for the per-layer table and the trace. Steps are timed one
at a time (the device is waited for after each), so a phase's time is its own, not hidden by overlap.
"""

from __future__ import annotations

import itertools
import json
import resource
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import resolve_loader
from ..data.synthetic import synthetic_images, synthetic_volumes
from ..train import PretrainConfig, Pretrainer, Pretrainer2D
from ..train.config import CHOICES
from ..train.phases import PHASES, PhaseTimer
from ..train.prefetch import Prefetcher
from ..train.step import pretrain_step, step_rng
from ..train.trace import trace_name
from ..utils.device import resolve_device
from ..utils.io import atomic_write
from .flops import layer_flops, model_flops, step_passes
from .layers import profile_layers
from .peaks import device_peak

# The matrix axes of --compare and how a value is read; the baseline is the official-equivalent step.
COMPARE_AXES = {"precision": str, "channels_last": bool, "compile": bool, "kernels": str, "loader": str,
                "prefetch": int}
BASELINE = {"precision": "fp32", "channels_last": False, "compile": False, "kernels": "torch"}
PHASE_TOLERANCE = 0.05  # the phases must add up to the measured step within this share


@dataclass
class ProfileConfig:
    train: PretrainConfig
    steps: int = 20
    warmup: int = 5
    synthetic: bool = False
    layer_steps: int = 3  # steps under torch.profiler for the per-layer table and the trace
    compare: dict[str, list] = field(default_factory=dict)
    progress: bool = True

    def validate(self) -> ProfileConfig:
        if self.steps < 1 or self.warmup < 0 or self.layer_steps < 0:
            raise ValueError(f"--steps must be >= 1 and --warmup, --layer-steps >= 0; got {self.steps}, "
                             f"{self.warmup}, {self.layer_steps}")
        if not self.synthetic and not self.train.data:
            raise ValueError("give --data (a cache or scans) or --synthetic")
        self.train.validate()
        for config in compare_configs(self.train, self.compare):
            check_device_options(config)
        return self


# ------------------------------------------------------------------------------------------- the matrix
def parse_compare(items: list[str]) -> dict[str, list]:
    """``["precision=fp32,bf16", "channels_last=0,1"]`` -> {"precision": ["fp32", "bf16"], "channels_last": [False,
    True]}; unknown axes and values are a ValueError naming the allowed ones."""
    matrix = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in COMPARE_AXES or not values:
            raise ValueError(f"--compare takes AXIS=V1,V2 with AXIS one of {sorted(COMPARE_AXES)}, got {item!r}")
        parsed = []
        for value in values.split(","):
            if COMPARE_AXES[key] is bool:
                if value not in ("0", "1"):
                    raise ValueError(f"--compare {key} takes 0 or 1, got {value!r}")
                parsed.append(value == "1")
            elif COMPARE_AXES[key] is int:
                if not value.isdigit():
                    raise ValueError(f"--compare {key} takes whole numbers >= 0, got {value!r}")
                parsed.append(int(value))
            else:
                allowed = CHOICES[key]
                if value not in allowed:
                    raise ValueError(f"--compare {key} takes values from {allowed}, got {value!r}")
                parsed.append(value)
        matrix[key] = parsed
    return matrix


def compare_configs(base: PretrainConfig, matrix: dict[str, list]) -> list[PretrainConfig]:
    """The baseline (official-equivalent step) first, then every combination of the matrix."""
    if not matrix:
        return [base]
    configs = [replace(base, **BASELINE)]
    for values in itertools.product(*matrix.values()):
        config = replace(base, **dict(zip(matrix, values, strict=True)))
        if config not in configs:
            configs.append(config)
    return configs


def check_device_options(cfg: PretrainConfig) -> None:
    """Settings that cannot run as asked on the chosen device: one ValueError before anything runs."""
    if cfg.loader != "auto":
        resolve_loader(cfg.loader)  # names what is missing (the C++ extension, DALI)
    cuda = resolve_device(cfg.device).type == "cuda"  # a CUDA device without CUDA is its own clear error
    if not cuda and cfg.precision == "tf32":
        raise ValueError("precision tf32 is fp32 on the CPU (TF32 is a CUDA matmul mode); compare fp32 instead")
    if not cuda and cfg.kernels == "triton":
        from ..kernels import interpreting

        if not interpreting():
            raise ValueError("kernels triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU, for testing)")


def label(trainer: Pretrainer) -> str:
    """The configuration in a few words: precision, channels-last, compile, kernels, the loader that ran."""
    cfg = trainer.cfg
    return (f"{cfg.precision}{' cl' if cfg.channels_last else ''}{' compile' if cfg.compile else ''} "
            f"{cfg.kernels} {trainer.loader_name}")


# ------------------------------------------------------------------------------------------- one profile
class TimedRun:
    """A trainer and its host batches, one timed iteration at a time (the profile's and the end-to-end
    benchmark's runner).

    With the trainer's prefetch depth 0 (the CPU default) each batch is built and copied in the step's thread
    and timed as ``data_wait`` and ``h2d``; with a depth above 0 the trainer's :class:`Prefetcher` builds and
    copies batches ahead in its thread, and ``data_wait`` is the time the step waited for the queue (the copy
    is inside it, so there is no ``h2d`` phase)."""

    def __init__(self, cfg: PretrainConfig, volumes):
        self.trainer = (Pretrainer2D if cfg.dims == 2 else Pretrainer)(cfg, volumes)
        self.timer = PhaseTimer(self.trainer.device)
        self.trainer.step_module.phase = self.timer
        self.feed = None
        if self.trainer.prefetch > 0:
            # The tag carries the host batch through the queue, to be released after the step that reads it.
            source = (((epoch, host), host) for epoch, host in self._host_batches())
            self.feed = Prefetcher(source, self.trainer.device_batch, self.trainer.device, self.trainer.prefetch)
        self._batches = self._host_batches()
        self._held: list = []
        self.step = 0

    def _host_batches(self):
        trainer = self.trainer
        for count in itertools.count():
            epoch = count % max(trainer.total_epochs, 1)  # the schedules' epoch: profiles run past the run's end
            for batch in trainer.batches(epoch, 0):
                yield epoch, batch

    def _next_micro(self) -> tuple[int, dict]:
        """(epoch, device batch) of the next micro-batch, timed as data_wait (and h2d when built here)."""
        timer = self.timer
        if self.feed is not None:
            with timer("data_wait"):
                (epoch, host), device_batch, _ = next(self.feed)
        else:
            with timer("data_wait"):
                epoch, host = next(self._batches)
            with timer("h2d"):
                device_batch = self.trainer.device_batch(host)
        self._held.append(host)
        return epoch, device_batch

    def iterate(self) -> tuple[float, dict[str, float]]:
        """One step: data, host-to-device, the step; returns (measured seconds, {phase: seconds})."""
        trainer, timer = self.trainer, self.timer
        start = timer.mark()
        micro = [self._next_micro() for _ in range(trainer.cfg.accumulate)]
        epoch = micro[-1][0]
        views = [(m["x1"], m["x2"], m["gt"], m["loc"]) for _, m in micro]
        pretrain_step(trainer.engine, views, epoch, step_rng(trainer.cfg.seed, self.step))
        end = timer.mark()
        total = timer.seconds(start, end)  # waits for the device: nothing of this step is still running
        phases = timer.collect()
        for host in self._held:  # read by the finished step only: the loader may reuse their buffers
            if hasattr(host, "release"):
                host.release()
        self._held = []
        self.step += 1
        return total, phases

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
        self.trainer.close()


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean_s": float(np.mean(values)), "p90_s": float(np.percentile(values, 90))}


def _phase_table(records: list[tuple[float, dict]]) -> tuple[dict, dict, dict]:
    totals = [t for t, _ in records]
    step = _stats(totals)
    phases = {}
    for name in PHASES:
        values = [p.get(name, 0.0) for _, p in records]
        if any(values):
            phases[name] = {**_stats(values), "share": float(np.mean(values)) / step["mean_s"]}
    gaps = [abs(t - sum(p.values())) / t for t, p in records]
    check = {"max_gap": float(max(gaps)), "tolerance": PHASE_TOLERANCE, "ok": max(gaps) <= PHASE_TOLERANCE}
    return step, phases, check


def _memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    # ru_maxrss is in KiB on Linux: the process's peak resident memory (data, model and Python together).
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _flops(run: TimedRun) -> tuple[int, dict[str, int]]:
    trainer = run.trainer
    if trainer.cfg.dims == 2:
        v = trainer.dataset.views
        passes = step_passes(trainer.micro_batch, (v.global_size,) * 2, (v.local_size,) * 2, v.n_local, channels=3)
    else:
        crop = trainer.dataset.crop
        passes = step_passes(trainer.micro_batch, crop.global_out, crop.local_out, crop.n_local)
    scale = trainer.cfg.accumulate
    return (model_flops(trainer.model, passes) * scale,
            {k: v * scale for k, v in layer_flops(trainer.model, passes).items()})


def _timed(run: TimedRun, steps: int, warmup: int, progress: bool, desc: str) -> list[tuple[float, dict]]:
    records = []
    for i in tqdm(range(warmup + steps), desc=desc, unit="step", disable=not progress, leave=False):
        record = run.iterate()
        if i >= warmup:
            records.append(record)
    return records


def _layer_table(run: TimedRun, cfg: ProfileConfig, out: Path, layer_flops_: dict[str, int]) -> dict:
    if cfg.layer_steps == 0:
        return {"layers": [], "top_kernels": [], "trace": None}
    walls: list[float] = []

    def one_step():
        walls.append(run.iterate()[0])

    found = profile_layers(run.trainer.model, one_step, cfg.layer_steps, out / trace_name(0), run.trainer.device)
    step_s = float(np.mean(walls))
    rows = []
    for name, flops in layer_flops_.items():
        times = found["layers"].get(name, {"fwd_s": 0.0, "bwd_s": 0.0})
        seconds = times["fwd_s"] + times["bwd_s"]
        rows.append({"layer": name, "flops": flops, "fwd_s": times["fwd_s"], "bwd_s": times["bwd_s"],
                     "tflops": flops / seconds / 1e12 if seconds > 0 else None, "share": seconds / step_s})
    rows.sort(key=lambda r: -(r["fwd_s"] + r["bwd_s"]))
    return {"layers": rows, "top_kernels": found["top_kernels"], "trace": found["trace"],
            "profiled_step_s": step_s}


def profile_one(run: TimedRun, cfg: ProfileConfig, out: Path) -> dict:
    trainer = run.trainer
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    records = _timed(run, cfg.steps, cfg.warmup, cfg.progress, "profile")
    step, phases, check = _phase_table(records)
    total_flops, per_layer = _flops(run)
    peak, peak_source = device_peak(trainer.device, trainer.cfg.precision)
    achieved = total_flops / step["mean_s"] / 1e12
    result = {
        "config": label(trainer), "device": str(trainer.device), "steps": cfg.steps, "warmup": cfg.warmup,
        "batch_size": trainer.cfg.batch_size, "micro_batch": trainer.micro_batch, "width": trainer.cfg.width,
        "step": step, "phases": phases, "phase_check": check,
        "throughput": {"samples_per_s": trainer.cfg.batch_size / step["mean_s"], "model_flops_per_step": total_flops,
                       "achieved_tflops": achieved, "peak_tflops": peak, "peak_source": peak_source,
                       "mfu": achieved / peak if peak else None},
        "memory": _memory(trainer.device),
    }
    result.update(_layer_table(run, cfg, out, per_layer))
    return result


# ------------------------------------------------------------------------------------------- the command
def _volumes(cfg: ProfileConfig):
    if not cfg.synthetic:
        return None
    return synthetic_images() if cfg.train.dims == 2 else synthetic_volumes()


def _compare(cfg: ProfileConfig, out: Path) -> dict:
    configs = compare_configs(replace(cfg.train, out=str(out)), cfg.compare)
    volumes = _volumes(cfg)
    runs = [TimedRun(c, volumes) for c in configs]
    labels = [label(run.trainer) for run in runs]
    try:
        records: list[list] = [[] for _ in runs]
        total = (cfg.warmup + cfg.steps) * len(runs)
        with tqdm(total=total, desc="compare", unit="step", disable=not cfg.progress, leave=False) as bar:
            for i in range(cfg.warmup + cfg.steps):  # round-robin: drift hits every configuration alike
                for k, run in enumerate(runs):
                    t, _ = run.iterate()
                    if i >= cfg.warmup:
                        records[k].append(t)
                    bar.update(1)
    finally:
        for run in runs:
            run.close()
    base = float(np.mean(records[0]))
    rows = [{"config": name, "step_s": float(np.mean(r)), "samples_per_s": c.batch_size / float(np.mean(r)),
             "speedup": base / float(np.mean(r)), "baseline": k == 0}
            for k, (c, name, r) in enumerate(zip(configs, labels, records, strict=True))]
    fastest = max(rows, key=lambda r: r["samples_per_s"])
    return {"rows": rows, "fastest": fastest["config"], "steps": cfg.steps, "warmup": cfg.warmup}


def profile(cfg: ProfileConfig) -> dict:
    """Run the profile and write OUT/profile.json, profile.png, trace.pt.trace.json (and compare.png with a matrix)."""
    from .report import save_compare_png, save_profile_png

    cfg.validate()
    out = Path(cfg.train.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if cfg.compare:
        result["compare"] = _compare(cfg, out)
        result["files"] = {"compare_png": str(save_compare_png(out / "compare.png", result["compare"]))}
    else:
        run = TimedRun(cfg.train, _volumes(cfg))
        try:
            result = profile_one(run, cfg, out)
        finally:
            run.close()
        result["files"] = {"profile_png": str(save_profile_png(out / "profile.png", result)),
                           "trace": result["trace"]}
    result["files"]["profile_json"] = str(out / "profile.json")
    with atomic_write(out / "profile.json", "w") as f:
        json.dump(result, f, indent=1)
    return result
