"""The run folder of a pretraining run: claiming it, checkpoints (save, resume, ``--resume auto``) and the
metric rows a resumed run replaces. Rank 0 alone writes; every process reads the checkpoint it resumes from.

:class:`RunFolder` holds these as methods of the trainer (:class:`~pcrlv2_fast.train.loop.Pretrainer` mixes it in):
they read and restore its model, optimizer, scaler, counters and step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .._version import __version__
from ..checkpoint import (
    LATEST,
    CheckpointError,
    check_state_dict,
    find_latest_checkpoint,
    read_training_checkpoint,
    save_rotating_checkpoint,
)
from ..utils.io import WriteError, atomic_write
from ..utils.run_folder import clear_earlier_run, earlier_run
from . import distributed as D
from .optim import prime_momentum
from .trace import trace_name

# What a run writes into its folder (removed by --overwrite before a fresh start); "trace.json" is the trace's
# name in runs of earlier versions.
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json", "config.json", "restoration.png", "loss_curve.png",
             trace_name(0), "trace.json")
RUN_GLOBS = ("checkpoint-*.pt", "events.out.tfevents.*", "trace-rank*.json")


class RunFolder:
    """Checkpoint and run-folder methods of the trainer."""

    def state(self) -> dict:
        skipped, counts, streak = self.counters.read()
        return {
            "skipped": skipped,
            "skip_counts": counts,
            "nonfinite_streak": streak,
            "scaler": self.scaler.state_dict(),
            "config": self.cfg.to_dict(),
            "resolved": self.resolved(),
            "pcrlv2_fast_version": __version__,
            "arch": ({"dims": 2, "network": "resnet18-unet2d"} if self.cfg.dims == 2 else
                     {"width": self.cfg.width, "norm": self.cfg.norm, "act": self.cfg.act}),
        }

    def save(self) -> Path:
        """Checkpoint the current step (rank 0; once per step), keeping ``keep_checkpoints`` older ones."""
        latest = self.out / LATEST
        if not self.dist.is_main or self._saved_step == self.step:
            return latest
        try:
            save_rotating_checkpoint(self.out, self.step, self.model, self.optimizer,
                                     epoch=self.step // self.steps_per_epoch, keep=self.cfg.keep_checkpoints,
                                     **self.state())
        except WriteError as error:
            kept = f"; the checkpoints saved before ({latest}, numbered files) are intact" if latest.exists() else ""
            raise WriteError(error.errno, f"{error}{kept}; continue with --resume auto") from error
        self._saved_step = self.step
        return latest

    def resume(self, path: str | Path) -> None:
        self._load(read_training_checkpoint(path, trusted=self.cfg.trust_checkpoint), path)

    def _load(self, ckpt: dict, path: str | Path) -> None:
        check_state_dict(self.model, ckpt["state_dict"], path)
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if isinstance(self.optimizer, torch.optim.SGD) and self.cfg.momentum:
            prime_momentum(self.optimizer)  # checkpoints of runs without primed buffers
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.counters.load(dict(ckpt.get("skip_counts", {})), int(ckpt.get("nonfinite_streak", 0)))
        self._saved_step = self.step
        # Settings that change the samples, the schedule or the objective make the continuation another run.
        saved = {**(ckpt.get("config") or {}), **(ckpt.get("resolved") or {})}
        now = {**self.cfg.to_dict(), **self.resolved()}
        changed = [k for k in ("seed", "batch_size", "pairs_per_volume", "total_steps", "lr", "optimizer", "all_scales")
                   if k in saved and saved[k] != now[k]]
        if changed and self.dist.is_main:
            print(f"warning: {path} was saved with other settings ({', '.join(f'{k}={saved[k]!r}' for k in changed)});"
                  " the continuation will differ from an uninterrupted run", file=sys.stderr)
        if self.dist.is_main:
            self._truncate_metrics(self.step)

    def _resume_for_run(self) -> Path | None:
        """Load the checkpoint --resume names (``auto``: the newest readable one in the run folder, if any)."""
        cfg = self.cfg
        if not cfg.resume:
            return None
        if cfg.resume == "auto":
            found = find_latest_checkpoint(self.out, on_skip=self._skip_checkpoint, trusted=cfg.trust_checkpoint)
            if found is None:
                if self.skipped_checkpoints:
                    raise CheckpointError(f"{self.out}: no checkpoint there is readable "
                                          f"({', '.join(p.name for p in self.skipped_checkpoints)}); pass --overwrite "
                                          "to start again")
                return None
            path, ckpt = found
        else:
            path = Path(cfg.resume)
            ckpt = read_training_checkpoint(path, trusted=cfg.trust_checkpoint)
        self._load(ckpt, path)
        steps = D.gather_objects(self.step, self.dist)
        if len(set(steps)) > 1:
            raise CheckpointError(f"the processes resumed at different steps {steps}: every process must read the same "
                                  "--out folder (a shared file system)")
        self.resumed_from = Path(path)
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}")
        return self.resumed_from

    def _skip_checkpoint(self, path: Path, error: CheckpointError) -> None:
        self.skipped_checkpoints.append(path)
        if self.dist.is_main:
            print(f"warning: skipping an unreadable checkpoint: {error}", file=sys.stderr)

    def _claim_run_folder(self, force: bool) -> None:
        """A fresh run never mixes its metrics or checkpoints with an earlier run's in the same folder."""
        previous = earlier_run(self.out, RUN_FILES, RUN_GLOBS, overwrite=force, refusal=(
            "{out} already holds a run ({files}); pass --resume auto to continue it, --overwrite to start again, or "
            "choose another --out"))
        clear_earlier_run(self.out, previous)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows logged after the checkpoint we resume from (they will be produced again), and a last
        line cut short by a killed run."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in keep))
