"""The fine-tuning loop: split by patient, train on random patches, keep the best checkpoint by validation.

One run writes into its folder:

- ``split.json``: the patient-level split (labelled training, unused training, validation and test cases);
- ``metrics.jsonl``: one row per epoch (``epoch``, ``step``, training ``loss``, ``lr``, the validation metrics,
  ``time_s``), which :func:`pcrlv2_fast.viz.save_loss_curve_png` can plot (``loss_curve.png``);
- ``best.pt``: the network with the best validation metric (mean foreground Dice for segmentation, ROC AUC for
  classification, accuracy when AUC is undefined), written atomically, in the official checkpoint layout with a
  ``finetune`` record (architecture, preprocessing, split, patch size) that ``pcrlv2-fast evaluate`` uses;
- ``test_metrics.json`` and ``test_overlays.png``: the best network on the test split;
- ``summary.json``: configuration, best epoch and metric, test headline numbers, timings.

Losses come from MONAI (DiceCELoss, softmax over classes) for segmentation and from torch (cross-entropy) for
classification. AdamW with a per-step cosine schedule; layer-wise learning rates through
:func:`pcrlv2_fast.encoders.layerwise_param_groups`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .._version import __version__
from ..checkpoint import save_checkpoint
from ..encoders import count_parameters, encoder_state_dict, layerwise_param_groups
from ..utils.device import resolve_device
from ..utils.io import atomic_write
from ..utils.lock import folder_lock
from ..utils.run_folder import clear_earlier_run, earlier_run
from ..utils.schedule import cosine_factor
from .data import LoadedCase, PatchSampler, Preprocessing, finalize_labels, find_cases, load_cases, resize_volume
from .evaluate import evaluate_loaded, load_finetuned, write_results
from .metrics import nan_to_none
from .model import MODES, build_model
from .options import PRECISIONS, TASKS
from .split import Split, make_split

__all__ = ["FinetuneConfig", "finetune"]

RUN_FILES = ("best.pt", "metrics.jsonl", "split.json", "summary.json", "test_metrics.json", "test_overlays.png",
             "loss_curve.png")


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; ``from_name("cpu" | "gpu", **overrides)`` starts from a preset."""

    task: str = "seg"
    data: str = ""
    out: str = ""
    init: str = "random"  # a PCRLv2 checkpoint (ours, official, exported encoder) or "random"
    trust_checkpoint: bool = False  # let --init unpickle types outside the allow-list (runs code from the file)
    mode: str = "full"  # full | frozen | linear
    label_fraction: float = 1.0
    seed: int = 0
    split_seed: int | None = None  # the train/val/test split's seed; None: `seed` (which always draws the rest)
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    # network (width/norm/act: the checkpoint's unless given; random init: 32 / bn / relu)
    width: int | None = None
    norm: str | None = None
    act: str | None = None
    freeze_stages: int = 0
    pool: str = "avg"
    dropout: float = 0.0
    # optimisation
    epochs: int = 10
    iters_per_epoch: int = 20
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (64, 64, 32)  # training patch / sliding window (seg); input size (cls)
    lr: float = 1e-3
    layer_decay: float = 1.0
    weight_decay: float = 1e-4
    fg_prob: float = 0.67
    flip: bool = False  # mirroring swaps left/right organs (liver/spleen, kidneys); enable for symmetric targets
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    # validation and test
    sw_overlap: float = 0.25
    sw_batch_size: int = 2
    hd95: bool = False
    # preprocessing
    spacing: tuple[float, float, float] | None = None  # None: each scan's own spacing
    modality: str = "auto"
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    keep_labels: tuple[int, ...] | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    allow_empty_labels: bool = False
    # run
    device: str = "auto"
    progress: bool = True
    overwrite: bool = False

    PRESETS = {
        # Minutes on a laptop CPU: small patches, few short epochs.
        "cpu": {},
        # A GPU run in the spirit of the paper's fine-tuning: larger patches, long schedule.
        "gpu": dict(epochs=100, iters_per_epoch=250, batch_size=4, patch_size=(96, 96, 64), sw_overlap=0.5,
                    precision="bf16", sw_batch_size=4),
    }

    @classmethod
    def from_name(cls, name: str, **overrides) -> FinetuneConfig:
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(spacing=self.spacing, modality=self.modality, hu_window=tuple(self.hu_window),
                             keep_labels=self.keep_labels, num_classes=self.num_classes,
                             allow_empty=self.allow_empty_labels)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.data or not self.out:
            raise ValueError("data and out are required")
        for name in ("epochs", "iters_per_epoch", "batch_size", "sw_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive sizes (x, y, z), got {self.patch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ValueError(f"sw_overlap must be in [0, 1), got {self.sw_overlap}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class _Best:
    metric: float = -math.inf
    epoch: int = 0
    name: str = ""


def _class_names(cfg: FinetuneConfig, num_classes: int, found: list[str] | None) -> list[str]:
    """Names of the scored classes: the foreground classes (seg) or every class (cls)."""
    wanted = num_classes - 1 if cfg.task == "seg" else num_classes
    if cfg.class_names:
        if len(cfg.class_names) != wanted:
            raise ValueError(f"{len(cfg.class_names)} class names given for {wanted} "
                             f"{'foreground ' if cfg.task == 'seg' else ''}classes")
        return list(cfg.class_names)
    if cfg.task == "cls":
        return list(found) if found else [f"class_{i}" for i in range(num_classes)]
    if cfg.keep_labels:
        return [f"label_{v}" for v in cfg.keep_labels]
    return [f"class_{i}" for i in range(1, num_classes)]


def _selection_metric(task: str, result: dict) -> tuple[str, float]:
    if task == "seg":
        return "val_dice", result.get("mean_dice", math.nan)
    auc = result.get("auc", math.nan)
    return ("val_auc", auc) if not math.isnan(auc) else ("val_accuracy", result.get("accuracy", math.nan))


def _cls_batch(inputs: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator, flip: bool):
    index = rng.integers(len(inputs), size=batch_size)
    x = inputs[index].copy()
    if flip:
        for b in range(batch_size):
            for axis in range(3):
                if rng.random() < 0.5:
                    x[b] = np.flip(x[b], axis + 1)
    return np.ascontiguousarray(x), labels[index]


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one fine-tuning experiment (see the module docstring); returns the summary. One process at a time may
    use a run folder: a second one pointed at it is refused (FolderBusyError) while the first runs."""
    cfg.validate()
    with folder_lock(cfg.out, "finetune", hint="wait for it to end, or choose another --out"):
        return _finetune(cfg)


@dataclass
class _Data:
    """The loaded cases of one experiment, by split, and what the labels turned out to be."""

    split: Split
    prep: Preprocessing
    train: list[LoadedCase]
    val: list[LoadedCase]
    test: list[LoadedCase]
    num_classes: int
    class_names: list[str]


def _finetune(cfg: FinetuneConfig) -> dict:
    started = time.perf_counter()
    out, device = Path(cfg.out), resolve_device(cfg.device)
    data, existing = _load_data(cfg, out)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model, arch = build_model(cfg.task, cfg.mode, data.num_classes, data.train[0].image.shape[0], init=cfg.init,
                              width=cfg.width, norm=cfg.norm, act=cfg.act, freeze_stages=cfg.freeze_stages,
                              pool=cfg.pool, dropout=cfg.dropout, trusted=cfg.trust_checkpoint)
    model.to(device)
    # Everything is checked: only now does the run folder change.
    clear_earlier_run(out, existing)
    with atomic_write(out / "split.json", "w") as fh:
        json.dump(data.split.to_dict(), fh, indent=2)
    if cfg.progress:
        tqdm.write(f"fine-tuning {arch['model']} ({cfg.mode}, init {cfg.init}, width {arch['width']}, "
                   f"{count_parameters(model, trainable_only=True):,} trainable parameters) on "
                   f"{len(data.train)} labelled training cases (label fraction {cfg.label_fraction:g}), "
                   f"{len(data.val)} validation, {len(data.test)} test; {device}")
    meta = {
        "task": cfg.task, "arch": arch, "preprocessing": data.prep.to_dict(), "patch_size": list(cfg.patch_size),
        "sw_overlap": cfg.sw_overlap, "class_names": data.class_names, "split": data.split.to_dict(),
        "data": str(cfg.data), "init": cfg.init, "mode": cfg.mode, "label_fraction": cfg.label_fraction,
        "hd95": cfg.hd95, "config": cfg.to_dict(), "pcrlv2_fast_version": __version__,
    }
    best, steps = _train(cfg, model, data, rng, device, out, meta)
    test, files = _score_test(cfg, out, data, device, best)
    headline = {k: test[k] for k in ("mean_dice", "mean_hd95", "dice_per_class", "auc", "accuracy") if k in test}
    split = data.split
    summary = {
        "config": cfg.to_dict(), "arch": arch, "num_classes": data.num_classes, "class_names": data.class_names,
        "cases": {"train": len(split.train), "unlabelled": len(split.unlabelled), "val": len(split.val),
                  "test": len(split.test)},
        "best_epoch": best.epoch, "best_metric_name": best.name, "best_metric": best.metric,
        "test": headline, "steps": steps, "wall_time_s": round(time.perf_counter() - started, 2),
        "device": str(device), "files": {k: str(v) for k, v in files.items()},
    }
    with atomic_write(out / "summary.json", "w") as fh:
        json.dump(nan_to_none(summary), fh, indent=2)
        fh.write("\n")
    return summary


def _load_data(cfg: FinetuneConfig, out: Path) -> tuple[_Data, list[Path]]:
    """The split and the loaded cases, and the files of an earlier run in ``out`` (refused without --overwrite);
    the checkpoint to start from is checked before the data are read."""
    cases, found_names = find_cases(cfg.data, cfg.task)
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    split = make_split({c.case_id: c.patient for c in cases}, seed=split_seed, val_fraction=cfg.val_fraction,
                       test_fraction=cfg.test_fraction, label_fraction=cfg.label_fraction, subset_seed=cfg.seed)
    existing = earlier_run(out, RUN_FILES, overwrite=cfg.overwrite, refusal="{out}: already holds a fine-tuning run "
                           "({files}); pass --overwrite to replace it or choose another --out")
    if cfg.init != "random":
        encoder_state_dict(cfg.init, trusted=cfg.trust_checkpoint)  # a bad checkpoint fails now, not after the data
    prep = cfg.preprocessing()
    by_id = {c.case_id: c for c in cases}
    needed = [by_id[i] for i in (*split.train, *split.val, *split.test)]
    loaded = {lc.case_id: lc for lc in load_cases(needed, prep, cfg.task, progress=cfg.progress)}
    num_classes = finalize_labels(list(loaded.values()), prep, cfg.task, source=str(cfg.data))
    data = _Data(split, prep, [loaded[i] for i in split.train], [loaded[i] for i in split.val],
                 [loaded[i] for i in split.test], num_classes, _class_names(cfg, num_classes, found_names))
    return data, existing


def _batches(cfg: FinetuneConfig, train: list[LoadedCase], rng: np.random.Generator):
    """(loss function, a callable giving the next (inputs, targets) numpy batch) of the task."""
    if cfg.task == "seg":
        from monai.losses import DiceCELoss

        sampler = PatchSampler(train, cfg.patch_size, rng, fg_prob=cfg.fg_prob, flip=cfg.flip)
        return DiceCELoss(to_onehot_y=True, softmax=True), lambda: sampler.batch(cfg.batch_size)
    inputs = np.stack([resize_volume(lc.image, cfg.patch_size) for lc in train])
    labels = np.array([int(lc.label) for lc in train], dtype=np.int64)
    return torch.nn.CrossEntropyLoss(), lambda: _cls_batch(inputs, labels, cfg.batch_size, rng, cfg.flip)


def _train(cfg: FinetuneConfig, model, data: _Data, rng: np.random.Generator, device: torch.device, out: Path,
           meta: dict) -> tuple[_Best, int]:
    """The epochs: train, score the validation split, keep the best checkpoint (best.pt), log a metrics row."""
    groups = layerwise_param_groups(model, cfg.lr, cfg.layer_decay, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    loss_fn, next_batch = _batches(cfg, data.train, rng)
    best, step, total_steps = _Best(), 0, cfg.epochs * cfg.iters_per_epoch
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        losses, factor = [], 1.0
        model.train()
        bar = tqdm(range(cfg.iters_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="it", leave=False,
                   disable=not cfg.progress)
        for _ in bar:
            factor = cosine_factor(step, total_steps)  # per step to 0; each group keeps its layer-wise share
            losses.append(_train_step(cfg, model, optimizer, loss_fn, next_batch(), factor, device))
            step += 1
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        train_time = time.perf_counter() - t0
        result = evaluate_loaded(model, data.val, cfg.task, data.num_classes, cfg.patch_size, data.class_names,
                                 device, overlap=cfg.sw_overlap, sw_batch_size=cfg.sw_batch_size, hd95=False)[0]
        name, value = _selection_metric(cfg.task, result)
        row = {"epoch": epoch, "step": step, "loss": float(np.mean(losses)), "lr": cfg.lr * factor, name: value,
               "train_time_s": round(train_time, 3), "time_s": round(time.perf_counter() - t0, 3)}
        row.update({"val_dice_per_class": result.get("dice_per_class")} if cfg.task == "seg"
                   else {"val_accuracy": result.get("accuracy")})
        row["best"] = epoch == 1 or (not math.isnan(value) and value > best.metric)
        if row["best"]:
            best = _Best(value if not math.isnan(value) else -math.inf, epoch, name)
            save_checkpoint(out / "best.pt", model, None, epoch=epoch,
                            finetune={**meta, "metric_name": name, "metric": value})
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(nan_to_none(row)) + "\n")
        if cfg.progress:
            tqdm.write(f"epoch {epoch}: loss {row['loss']:.4f}, {name} {value:.4f}{' (best)' if row['best'] else ''}, "
                       f"{row['time_s']:.1f} s")
    return best, step


def _train_step(cfg: FinetuneConfig, model, optimizer, loss_fn, batch, factor: float, device: torch.device) -> float:
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * group["lr_scale"] * factor
    x, y = (torch.from_numpy(a).to(device) for a in batch)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        logits = model(x)
    loss = loss_fn(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach().item()


def _score_test(cfg: FinetuneConfig, out: Path, data: _Data, device: torch.device, best: _Best):
    """The test split scored once, with the best checkpoint, as ``pcrlv2-fast evaluate`` would: (metrics, files)."""
    best_model, _ = load_finetuned(out / "best.pt")
    best_model.to(device)
    test, predictions = evaluate_loaded(best_model, data.test, cfg.task, data.num_classes, cfg.patch_size,
                                        data.class_names, device, overlap=cfg.sw_overlap,
                                        sw_batch_size=cfg.sw_batch_size, hd95=cfg.hd95, keep_predictions=True)
    record = {"checkpoint": str(out / "best.pt"), "data": str(cfg.data), "task": cfg.task, "init": cfg.init,
              "mode": cfg.mode, "label_fraction": cfg.label_fraction, "best_epoch": best.epoch}
    files = write_results(out, "test", test, record, data.test, predictions, cfg.task, data.num_classes,
                          data.class_names)
    files["checkpoint"] = out / "best.pt"
    files["metrics_jsonl"] = out / "metrics.jsonl"
    try:
        from ..viz import save_loss_curve_png

        files["loss_curve"] = save_loss_curve_png(out / "metrics.jsonl", out / "loss_curve.png",
                                                  title="fine-tuning loss")
    except ValueError as exc:  # e.g. every loss NaN: the run's numbers are still written
        tqdm.write(f"no loss curve: {exc}")
    return test, files
