"""The pretraining loop: one process, CPU or GPU, AMP and channels_last_3d, exact resume.

Reproducibility: the sample drawn at position i of epoch e is a pure function of (seed, e, i) (see
``PretrainDataset``), the batch order of an epoch a pure function of (seed, e), and the scale draws of a
step a pure function of (seed, step). A run resumed from a checkpoint therefore continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..checkpoint import CheckpointError, check_state_dict, read_checkpoint, save_checkpoint
from ..data import BatchLoader, CropConfig, PretrainDataset, Volume, cached_volumes, default_loader, resolve_loader
from ..losses import PCRLv2Loss
from ..models import NonSkipUNet3D
from ..utils.io import atomic_write
from .config import PretrainConfig

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# What a run writes into its folder (removed by --overwrite before a fresh start).
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json", "config.json", "restoration.png", "loss_curve.png")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def lr_at_epoch(base_lr: float, epoch: int, total_epochs: int) -> float:
    """Official cosine schedule, stepped once per epoch, over the run's own epochs (0 .. total_epochs-1)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / total_epochs))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def step_rng(seed: int, step: int) -> random.Random:
    """The scale draws of one step; string seeding is stable across processes and Python versions."""
    return random.Random(f"pcrlv2-scales-{seed}-{step}")


def local_batch(locals_: torch.Tensor) -> torch.Tensor:
    """(B, V, 1, X, Y, Z) -> (V*B, 1, X, Y, Z), view-major as the official ``torch.cat(local_views)``."""
    b, v = locals_.shape[:2]
    return locals_.transpose(0, 1).reshape(v * b, *locals_.shape[2:])


def build_optimizer(cfg: PretrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def pretrain_step(forward, loss_fn: PCRLv2Loss, optimizer, scaler, x1, x2, gt, loc, epoch: int, rng: random.Random,
                  amp_dtype: torch.dtype | None = None, skip_loss_above: float = 1000.0):
    """One PCRLv2 optimisation step: the official three forward passes (x1, x2, all local views batched),
    the objective, backward and the optimizer step. Returns (terms, skipped, (restoration, masks))."""
    autocast = torch.autocast(x1.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        restoration, feats1, masks = forward(x1)
        _, feats2, _ = forward(x2)
        _, feats_local, _ = forward(loc, local=True)
    terms = loss_fn(restoration, masks, feats1, feats2, feats_local, gt, epoch, rng)
    loss = terms.total.detach()
    # Non-finite losses are never applied; the official code also skips losses > 1000 after epoch 10.
    skip = not bool(torch.isfinite(loss)) or (float(loss) > skip_loss_above and epoch > 10)
    if not skip:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms.total).backward()
        scaler.step(optimizer)
        scaler.update()
    return terms, skip, (restoration, masks)


@dataclass
class StepOutput:
    terms: dict
    skipped: bool
    sample: dict = field(default_factory=dict)  # first sample's views and outputs (on the device), for pictures


class Pretrainer:
    """Builds data, model, objective and optimizer from a ``PretrainConfig`` and runs the loop."""

    def __init__(self, cfg: PretrainConfig, volumes: list[Volume] | None = None):
        self.cfg = cfg.validate()
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        if volumes is None:
            # A cache is memory-mapped as it is; raw scans are preprocessed into OUT/cache first (resumable).
            s = cfg.spacing
            volumes = cached_volumes(cfg.data, self.out / "cache", spacing=(s, s, s), modality=cfg.modality,
                                     workers=max(1, cfg.workers))
        self.dataset = PretrainDataset(volumes, CropConfig(), seed=cfg.seed, pairs_per_volume=cfg.pairs_per_volume)
        # "dataset": per-sample items through a DataLoader (cfg.workers processes); "torch" / "native": whole
        # batches cut and augmented in one pass (same samples, see data/loader.py).
        self.loader = resolve_loader(default_loader() if cfg.loader == "auto" else cfg.loader)
        if self.loader == "dali":
            from ..data.dali import DaliLoader

            self.batch_loader = DaliLoader(self.dataset, self.device, batch_size=cfg.batch_size)
        else:
            self.batch_loader = None if self.loader == "dataset" else BatchLoader(
                self.dataset, self.loader, self.device if self.loader == "torch" else "cpu")
        self.steps_per_epoch = len(self.dataset) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"an epoch has only {len(self.dataset)} samples ({len(volumes)} scans x {cfg.pairs_per_volume} pairs) "
                f"but --batch-size is {cfg.batch_size}; lower --batch-size or raise --pairs-per-volume"
            )
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

        torch.manual_seed(cfg.seed)
        self.model = NonSkipUNet3D(width=cfg.width, norm=cfg.norm, act=cfg.act).to(self.device)
        self.memory_format = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.optimizer = build_optimizer(cfg, self.model)
        self.amp_dtype = AMP_DTYPES.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.loss_fn = PCRLv2Loss(total_epochs=self.total_epochs, n_local=self.dataset.crop.n_local,
                                  all_scales=cfg.all_scales)
        self.step = 0
        self.skipped = 0
        self.forward = torch.compile(self.model) if cfg.compile else self.model

    # ----------------------------------------------------------------------------------------- state
    def state(self) -> dict:
        return {
            "step": self.step,
            "skipped": self.skipped,
            "scaler": self.scaler.state_dict(),
            "config": self.cfg.to_dict(),
            "pcrlv2_fast_version": __version__,
            "arch": {"width": self.cfg.width, "norm": self.cfg.norm, "act": self.cfg.act},
        }

    def save(self) -> Path:
        return save_checkpoint(self.out / "checkpoint.pt", self.model, self.optimizer,
                               epoch=self.step // self.steps_per_epoch, **self.state())

    def resume(self, path: str | Path) -> None:
        ckpt = read_checkpoint(path, map_location=self.device)
        for key in ("state_dict", "optimizer", "step"):
            if key not in ckpt:
                raise CheckpointError(f"{path}: has no {key!r}; only pcrlv2_fast training checkpoints can be resumed "
                                      "(use load_pretrained to start from official weights)")
        check_state_dict(self.model, ckpt["state_dict"], path)
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.skipped = int(ckpt.get("skipped", 0))
        self._truncate_metrics(self.step)

    def _claim_run_folder(self) -> None:
        """A fresh run never mixes its metrics or checkpoint with an earlier run's in the same folder."""
        previous = [self.out / name for name in RUN_FILES if (self.out / name).exists()]
        if not previous:
            return
        if not self.cfg.overwrite:
            raise ValueError(
                f"{self.out} already holds a run ({', '.join(p.name for p in previous)}); pass --resume auto to "
                "continue it, --overwrite to start again, or choose another --out"
            )
        for path in previous:
            path.unlink()

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows logged after the checkpoint we resume from (they will be produced again)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        keep = [line for line in rows if json.loads(line).get("step", 0) <= step]
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------------------------------ step
    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def train_step(self, batch: dict, epoch: int) -> StepOutput:
        x1, x2, gt = (self.to_device(batch[k]) for k in ("x1", "x2", "gt"))
        loc = self.to_device(local_batch(batch["locals"]))
        terms, skip, (restoration, masks) = pretrain_step(
            self.forward, self.loss_fn, self.optimizer, self.scaler, x1, x2, gt, loc, epoch,
            step_rng(self.cfg.seed, self.step), self.amp_dtype, self.cfg.skip_loss_above)
        # Views of the first sample, kept on the device: only the last step's are copied out, for the pictures.
        sample = {"x1": x1[0], "gt": gt[0], "restoration": restoration[0].detach(),
                  "masks": [m[0].detach() for m in masks]}
        return StepOutput(terms.as_dict(), skip, sample)

    # ------------------------------------------------------------------------------------------- run
    def batches(self, epoch: int, start: int):
        order = epoch_order(self.cfg.seed, epoch, len(self.dataset))
        bs = self.cfg.batch_size
        # Incomplete last batches are dropped: the projection BatchNorm1d layers fail on a batch of one.
        batch_indices = [order[i * bs:(i + 1) * bs].tolist() for i in range(start, self.steps_per_epoch)]
        self.dataset.set_epoch(epoch)
        if self.batch_loader is not None:
            return self.batch_loader.batches(batch_indices)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batch_indices, num_workers=self.cfg.workers,
                                           pin_memory=self.device.type == "cuda")

    def run(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = False
        if cfg.resume:
            path = self.out / "checkpoint.pt" if cfg.resume == "auto" else Path(cfg.resume)
            if path.exists() or cfg.resume != "auto":
                self.resume(path)
                resumed = True
                print(f"resumed from {path} at step {self.step}")
        if not resumed:
            self._claim_run_folder()
        with atomic_write(self.out / "config.json", "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        self.model.train()
        rates, last = [], None
        bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True)
        with open(self.out / "metrics.jsonl", "a") as metrics:
            while self.step < self.total_steps:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                lr = lr_at_epoch(cfg.lr, epoch, self.total_epochs)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                t_data = time.perf_counter()
                for batch in self.batches(epoch, start):
                    t_step = time.perf_counter()
                    last = self.train_step(batch, epoch)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    t_end = time.perf_counter()
                    self.step += 1
                    self.skipped += last.skipped
                    rate = cfg.batch_size / (t_end - t_data)
                    rates.append(rate)
                    row = {"step": self.step, "epoch": epoch, **last.terms, "lr": lr, "samples_per_s": rate,
                           "data_s": t_step - t_data, "step_s": t_end - t_step, "skipped": last.skipped}
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                    bar.set_postfix(loss=f"{row['loss']:.3f}", glob=f"{row['loss_global']:.3f}",
                                    loc=f"{row['loss_local']:.3f}", rest=f"{row['loss_restore']:.4f}",
                                    sps=f"{rate:.2f}")
                    bar.update(1)
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save()
                    if self.step >= self.total_steps:
                        break
                    t_data = time.perf_counter()
                self.save()
        bar.close()
        return self.finish(rates, last)

    def finish(self, rates: list[float], last: StepOutput | None) -> dict:
        from ..viz import save_loss_curve_png, save_restoration_png

        files = {"checkpoint": str(self.out / "checkpoint.pt"), "metrics": str(self.out / "metrics.jsonl")}
        if self.cfg.pictures and last is not None:
            s = {k: _cpu(v) for k, v in last.sample.items()}
            save_restoration_png(self.out / "restoration.png", s["x1"], s["gt"], s["restoration"], s["masks"],
                                 title=f"step {self.step}")
            save_loss_curve_png(self.out / "metrics.jsonl", self.out / "loss_curve.png")
            files.update(restoration=str(self.out / "restoration.png"), loss_curve=str(self.out / "loss_curve.png"))
        # Throughput excludes the first steps (allocator and compile warm-up) when there are enough of them.
        steady = rates[min(3, len(rates) // 2):] if rates else []
        summary = {
            "steps": self.step,
            "skipped_steps": self.skipped,
            "samples_per_s": float(np.median(steady)) if steady else None,
            "device": str(self.device),
            "precision": self.cfg.precision,
            "files": files,
        }
        with atomic_write(self.out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        return summary


def _cpu(t):
    if isinstance(t, list):
        return [_cpu(x) for x in t]
    return t.detach().float().cpu()


def pretrain(cfg: PretrainConfig, volumes: list[Volume] | None = None) -> dict:
    return Pretrainer(cfg, volumes).run()
