"""What a pretraining run reports: a metrics row every ``log_every`` steps (``metrics.jsonl``, TensorBoard, the
progress bar), the non-finite-loss guard, the pictures and ``summary.json``.

:class:`RunLog` holds these as methods of the trainer (:class:`~pcrlv2_fast.train.loop.Pretrainer` mixes it in).
Reading a step's results waits for the device, so it happens at log points only.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from ..checkpoint import LATEST
from ..reference.fused_losses import upsample_mask
from ..utils.io import WriteError, atomic_write
from . import distributed as D
from .step import SKIP_REASONS, TERMS, StepOutput
from .trace import trace_name

PERF_KEYS = ("samples_per_s", "data_wait_s", "step_s", "data_wait", "gpu_mem_gb")


class NonFiniteLossError(ValueError):
    """Too many steps in a row had a non-finite loss or gradient; the message says what was saved and what to try."""


class _Window:
    """Host-side timing of the steps since the last log point."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.wait = time.perf_counter(), 0, 0.0


class RunLog:
    """Logging, pictures and summary methods of the trainer."""

    def _at_log_point(self, last: StepOutput, window: _Window, rates: list[float], metrics, writer, bar) -> bool:
        """Every ``log_every`` steps (and at the end): read the step's results and the skip counters back from the
        device, agree with the other processes on stopping, write the metrics row and check the non-finite
        streak. Returns whether to stop. Between log points a single process still stops on its own signal."""
        cfg = self.cfg
        if not (self.step % self.log_every == 0 or self.step == self.total_steps):
            return not self.dist.enabled and self.stop_signal is not None
        values = torch.cat([last.stats.float(), last.norm.view(1).float(), last.code.view(1).float()]).tolist()
        terms, norm, code = dict(zip(TERMS, values[:len(TERMS)], strict=True)), values[-2], int(values[-1])
        skipped, _, streak = self.counters.read()
        stop, wait = self._agree(window.wait)
        elapsed = time.perf_counter() - window.start
        rate = cfg.batch_size * window.steps / elapsed
        rates.append(rate)
        row = {"step": self.step, "epoch": self._epoch, **terms, "lr": self.optimizer.param_groups[0]["lr"],
               "grad_norm": norm, "samples_per_s": rate, "data_wait_s": wait / window.steps,
               "step_s": elapsed / window.steps, "data_wait": min(1.0, wait / elapsed), "skipped": code != 0,
               "skip_reason": SKIP_REASONS[code], "skipped_total": skipped, "window_steps": window.steps}
        if self.scaler.is_enabled():
            row["loss_scale"] = self.scaler.get_scale()
        if self.device.type == "cuda":
            row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._log(row, metrics, writer)
        bar.set_postfix(loss=f"{row['loss']:.3f}", glob=f"{row['loss_global']:.3f}",
                        loc=f"{row['loss_local']:.3f}", rest=f"{row['loss_restore']:.4f}", sps=f"{rate:.2f}")
        window.reset()
        self._check_nonfinite_streak(streak)
        return stop

    def _build_probe(self):
        """The frozen-encoder probe of --probe (main process only; None without --probe)."""
        if not self.cfg.probe or not self.dist.is_main:
            return None
        from ..finetune.probe import VoxelProbe, load_probe_set  # SimpleITK: only with --probe

        probe_set = load_probe_set(self.cfg.probe, max_cases=self.cfg.probe_cases)
        return VoxelProbe(probe_set, seed=self.cfg.seed, norm=self.cfg.norm, act=self.cfg.act)

    def _probe_point(self, probe, metrics, writer) -> None:
        """Score the probe on the network as it is now and log a probe row (step, epoch, probe_dice, per class)."""
        if probe is None:
            return
        result = probe(self.model.state_dict())
        self.probe_scores.append((self.step, result["probe_dice"]))
        row = {"step": self.step, "epoch": self._epoch, "probe_dice": result["probe_dice"],
               **{f"probe_dice_{k}": v for k, v in enumerate(result["probe_dice_per_class"], start=1)}}
        self._log(row, metrics, writer)

    @property
    def skipped(self) -> int:
        return self.counters.read()[0]

    @property
    def skip_counts(self) -> dict[str, int]:
        return self.counters.read()[1]

    @property
    def nonfinite_streak(self) -> int:
        return self.counters.read()[2]

    def _check_nonfinite_streak(self, streak: int) -> None:
        cfg = self.cfg
        if cfg.max_nonfinite and streak >= cfg.max_nonfinite:
            path = self.save()
            raise NonFiniteLossError(
                f"{streak} steps in a row (steps {self.step - streak + 1}-"
                f"{self.step}) had a non-finite loss or gradient, so the run stopped (--max-nonfinite "
                f"{cfg.max_nonfinite}); step {self.step} is saved in {path}. Lower --lr, use --precision bf16 "
                "instead of fp16, or check the scans; --resume auto continues after these steps")

    def _agree(self, data_s: float) -> tuple[bool, float]:
        """(stop, data_s): whether any process was asked to stop, and the data wait (seconds) averaged over
        processes, in one reduction so that every process leaves the loop after the same step."""
        values = torch.tensor([float(self.stop_signal is not None), data_s], dtype=torch.float64, device=self.device)
        values = D.sum_across(values, self.dist).tolist()
        return values[0] > 0, values[1] / self.dist.world_size

    def _log(self, row: dict, metrics, writer) -> None:
        if metrics is not None:
            try:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            except OSError as error:
                raise WriteError(error.errno, f"{metrics.name}: could not be written ({error.strerror}); the rows of "
                                 "earlier steps are intact (a row cut short is dropped on resuming). Free space and "
                                 "continue with --resume auto") from error
        if writer is not None:
            for key, value in row.items():
                if key in ("step", "epoch", "skipped") or not isinstance(value, int | float):
                    continue
                group = "loss" if key.startswith("loss") and key != "loss_scale" else (
                    "perf" if key in PERF_KEYS else "probe" if key.startswith("probe") else "train")
                writer.add_scalar(f"{group}/{key}", value, row["step"])

    def _open_tensorboard(self, resumed: bool):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            print(f"note: no TensorBoard event files ({exc}); pip install tensorboard to get them", file=sys.stderr)
            return None
        # A resumed run drops the events an interrupted run logged after its checkpoint.
        writer = SummaryWriter(log_dir=str(self.out), purge_step=self.step + 1 if resumed else None, flush_secs=30)
        writer.add_text("config", "```\n" + json.dumps({**self.cfg.to_dict(), "resolved": self.resolved()},
                                                       indent=2) + "\n```", self.step)
        return writer

    def _pictures(self, last: StepOutput) -> dict[str, str]:
        """restoration.png and loss_curve.png ({name: path}); without matplotlib a one-line notice and none."""
        try:
            from ..viz import save_loss_curve_png, save_restoration_png
        except ImportError as exc:
            print(f"note: no pictures ({exc}); pip install matplotlib to get them", file=sys.stderr)
            return {}
        s = {k: _cpu(v) for k, v in last.sample.items()}
        s["masks"] = [upsample_mask(m, s["gt"].shape[1:])[0] for m in s["masks"]]
        save_restoration_png(self.out / "restoration.png", s["x1"], s["gt"], s["restoration"], s["masks"],
                             title=f"step {self.step}")
        save_loss_curve_png(self.out / "metrics.jsonl", self.out / "loss_curve.png")
        return {"restoration": str(self.out / "restoration.png"), "loss_curve": str(self.out / "loss_curve.png")}

    def finish(self, rates: list[float], last: StepOutput | None) -> dict:
        skipped, counts, _ = self.counters.read()
        # Throughput excludes the first steps (allocator and compile warm-up) when there are enough of them.
        steady = rates[min(3, len(rates) // 2):] if rates else []
        files = {"checkpoint": str(self.out / LATEST), "metrics": str(self.out / "metrics.jsonl")}
        summary = {
            "steps": self.step,
            "skipped_steps": skipped,
            "skip_counts": counts,
            "samples_per_s": float(np.median(steady)) if steady else None,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "rank": self.dist.rank,
            "precision": self.cfg.precision,
            "fused_blocks": self.fused_blocks,
            "stopped_by": self.stop_signal,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "files": files,
        }
        if self.probe_scores:
            summary["probe_dice"] = [{"step": step, "dice": dice} for step, dice in self.probe_scores]
        if not self.dist.is_main:
            return summary
        if self.cfg.pictures and last is not None:
            files.update(self._pictures(last))
        if self.cfg.profile_steps and (self.out / trace_name(0)).exists():
            files["trace"] = str(self.out / trace_name(0))
        if any(self.out.glob("events.out.tfevents.*")):
            files["tensorboard"] = str(self.out)
        with atomic_write(self.out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        return summary


def _cpu(t):
    if isinstance(t, list):
        return [_cpu(x) for x in t]
    return t.detach().float().cpu()
