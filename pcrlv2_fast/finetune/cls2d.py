"""2D fine-tuning (``finetune --task cls --dims 2``): multi-label chest X-ray classification with per-finding ROC
AUC, on a patient-level split of an NIH ChestX-ray14 ``Data_Entry`` CSV.

Labels: ``Finding Labels`` split at ``|``; each of the chosen findings (default the 14 of NIH ChestX-ray14) is one
sigmoid output, ``No Finding`` is all zeros. Split: by ``Patient ID`` (:func:`~pcrlv2_fast.finetune.split.make_split`,
so a label fraction keeps a share of the training patients and the validation and test patients never change).

Network: :class:`~pcrlv2_fast.models.Classifier2D` (the official head: average pool, dropout 0.2, linear),
initialised at random or from a PCRLv2 2D checkpoint (ours, official encoder-only, a torchvision ResNet-18
state_dict, a fine-tuned classifier). ``mode`` ``full`` trains everything, ``linear`` the head on the frozen encoder.
Training views: random resized crop (scale 0.08-1), rotation +-10 degrees, horizontal flip, ImageNet normalisation
(the official fine-tuning transforms, through ``views2d.batched_views``); evaluation: the centre 224/256 of the
image, resized (the official resize 256 -> centre crop 224). BCE on logits, Adam (official, lr 1e-4) with a
cosine schedule over the run (the official StepLR(50, 0.5) assumed hundreds of epochs).

A run folder holds ``split.json``, ``metrics.jsonl`` (per epoch: loss, validation mean AUC and per finding),
``best.pt`` (best validation mean AUC; ``finetune`` record for ``evaluate``), ``test_metrics.json``, ``test_roc.png``
and ``summary.json``. Deviations from the official fine-tuning, which never computed an AUC: validation without
training augmentation; the best epoch chosen by validation AUC.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._version import __version__
from ..checkpoint import (
    CheckpointError,
    check_state_dict,
    extract_state_dict,
    load_pretrained_2d,
    read_checkpoint,
    save_checkpoint,
)
from ..data.images2d import ImageBank, ImageError, check_fits_in_memory, read_csv_rows, read_image
from ..data.views2d import ViewConfig2D, batched_views, draw_view, stack_params
from ..models import Classifier2D
from ..utils.device import resolve_device
from ..utils.io import atomic_write
from ..utils.lock import folder_lock
from ..utils.run_folder import clear_earlier_run, earlier_run
from ..utils.schedule import cosine_factor
from .metrics import multilabel_auc, nan_to_none
from .split import Split, make_split

__all__ = ["NIH_FINDINGS", "Cls2DConfig", "LabelTable", "evaluate_cls2d", "finetune_cls2d", "load_table_images",
           "read_label_table"]

NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
RUN_FILES = ("best.pt", "metrics.jsonl", "split.json", "summary.json", "test_metrics.json", "test_roc.png")
CENTRE = 224 / 256  # the official evaluation: resize to 256, centre crop 224


@dataclass
class Cls2DConfig:
    data: str = ""
    out: str = ""
    init: str = "random"
    trust_checkpoint: bool = False
    findings: tuple[str, ...] | None = None  # None: the 14 NIH findings
    mode: str = "full"  # full | linear
    label_fraction: float = 1.0
    seed: int = 0
    split_seed: int | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    epochs: int = 5
    iters_per_epoch: int | None = None  # None: one pass over the labelled training images
    batch_size: int = 16
    image_size: int = 224
    lr: float = 1e-4
    weight_decay: float = 0.0
    dropout: float = 0.2
    precision: str = "fp32"  # fp32 | bf16
    device: str = "auto"
    progress: bool = True
    overwrite: bool = False

    def validate(self) -> Cls2DConfig:
        if self.mode not in ("full", "linear"):
            raise ValueError(f"--mode {self.mode} is not available with --dims 2: choose full or linear")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.image_size % 32 or self.image_size < 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.iters_per_epoch is not None and self.iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {self.iters_per_epoch}")
        if self.batch_size < 2 and self.mode == "full":
            raise ValueError("batch_size must be >= 2: the encoder's BatchNorm layers train on the batch")
        return self

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------------------ labels
@dataclass
class LabelTable:
    """The labelled images of an NIH CSV: file names, patients, (N, K) 0/1 labels over ``findings``."""

    csv: Path
    names: list[str]
    patients: list[str]
    labels: np.ndarray
    findings: tuple[str, ...]


def _label_csv(source: Path) -> Path:
    """The NIH CSV itself, or the one CSV with the NIH columns in a folder."""
    if source.is_file():
        return source
    if not source.is_dir():
        raise ImageError(f"{source}: no such file or folder")
    found = []
    for path in sorted(source.glob("*.csv")):
        try:
            read_csv_rows(path, NIH_COLUMNS)
            found.append(path)
        except ImageError:
            continue
    if len(found) != 1:
        what = "no CSV" if not found else f"{len(found)} CSVs ({', '.join(p.name for p in found)})"
        raise ImageError(f"{source}: {what} with the NIH columns {', '.join(NIH_COLUMNS)}; pass the Data_Entry CSV "
                         "itself as --data")
    return found[0]


def read_label_table(source: str | Path, findings=None) -> LabelTable:
    """The images, patients and labels of an NIH Data_Entry CSV (or the folder holding it)."""
    csv = _label_csv(Path(source))
    rows = read_csv_rows(csv, NIH_COLUMNS)
    findings = tuple(findings) if findings else NIH_FINDINGS
    names = [r["Image Index"].strip() for r in rows]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})[:3]
        raise ImageError(f"{csv}: images listed twice (e.g. {twice}); each image needs one row")
    sets = [{f.strip() for f in r["Finding Labels"].split("|")} for r in rows]
    labels = np.array([[f in s for f in findings] for s in sets], dtype=np.float32)
    never = [f for k, f in enumerate(findings) if labels[:, k].sum() == 0]
    if never:
        raise ImageError(f"{csv}: no image has the finding(s) {never}; findings are spelled as in 'Finding Labels' "
                         f"(e.g. {', '.join(NIH_FINDINGS[:3])})")
    return LabelTable(csv, names, [r["Patient ID"].strip() for r in rows], labels, findings)


def load_table_images(table: LabelTable, index: list[int], progress: bool) -> ImageBank:
    by_name = {p.name: p for p in table.csv.parent.rglob("*") if p.name in set(table.names)}
    missing = [table.names[i] for i in index if table.names[i] not in by_name]
    if missing:
        raise ImageError(f"{table.csv}: {len(missing)} listed images are not under {table.csv.parent} (first: "
                         f"{missing[:3]}); put the image folders beside the CSV")
    check_fits_in_memory([by_name[table.names[i]] for i in index], table.csv)
    images = [read_image(by_name[table.names[i]])
              for i in tqdm(index, desc="images", unit="img", disable=not progress, leave=False)]
    return ImageBank.from_arrays(images, [table.names[i] for i in index], [by_name[table.names[i]] for i in index])


# ------------------------------------------------------------------------------------------------- views
def _train_views(size: int) -> ViewConfig2D:
    """The official fine-tuning transforms: random resized crop (torchvision's default scale), rotation, flip."""
    return ViewConfig2D(global_size=size, local_size=32, n_local=0, global_scale=(0.08, 1.0), blur_p=0.0,
                        gray_p=0.0, jitter=(0.0, 0.0, 0.0, 0.0), cutout_holes=0)


def _centre_params(height: int, width: int) -> dict:
    h, w = max(1, round(height * CENTRE)), max(1, round(width * CENTRE))
    return {"box": np.array([(height - h) // 2, (width - w) // 2, h, w]), "angle": 0.0, "flip": False, "sigma": 0.0,
            "brightness": 1.0, "contrast": 1.0, "contrast_first": False, "holes": np.zeros((0, 4), np.int64)}


class _Images:
    """A bank on the device and the network inputs cut from it."""

    def __init__(self, bank: ImageBank, device: torch.device):
        self.bank, self.pixels = bank, torch.from_numpy(bank.pixels).to(device)

    def inputs(self, index: np.ndarray, params: list[dict], size: int) -> torch.Tensor:
        return batched_views(self.pixels, self.bank.scale, torch.as_tensor(index), stack_params(params), size)[1]

    def train_batch(self, index: np.ndarray, rng: np.random.Generator, size: int) -> torch.Tensor:
        cfg = _train_views(size)
        return self.inputs(index, [draw_view(rng, *self.bank.sizes[i], cfg, True) for i in index], size)

    def eval_batch(self, index: np.ndarray, size: int) -> torch.Tensor:
        return self.inputs(index, [_centre_params(*self.bank.sizes[i]) for i in index], size)


@torch.no_grad()
def predict(model: Classifier2D, images: _Images, index: np.ndarray, size: int, batch_size: int = 32,
            amp=None) -> np.ndarray:
    """Sigmoid probabilities (N, K) of the bank's images ``index`` at the evaluation view."""
    model.eval()
    out = []
    for start in range(0, len(index), batch_size):
        with _autocast(images.pixels.device, amp):
            out.append(torch.sigmoid(model(images.eval_batch(index[start:start + batch_size], size)).float()).cpu())
    return torch.cat(out).numpy()


def _autocast(device: torch.device, amp):
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


# --------------------------------------------------------------------------------------------- the model
def build_classifier(num_classes: int, init: str, dropout: float, mode: str, trusted: bool = False) -> Classifier2D:
    model = Classifier2D(num_classes, dropout)
    if init != "random":
        if not Path(init).is_file():
            raise CheckpointError(f"{init}: no such checkpoint file (pass a PCRLv2 2D checkpoint or 'random')")
        model.encoder.load_state_dict(load_pretrained_2d(init, trusted=trusted).encoder.state_dict())
    if mode == "linear":
        model.freeze_encoder()
    return model


# ---------------------------------------------------------------------------------------------- the run
def finetune_cls2d(cfg: Cls2DConfig) -> dict:
    """One 2D classification experiment (see the module docstring); returns the summary."""
    cfg.validate()
    with folder_lock(cfg.out, "finetune", hint="wait for it to end, or choose another --out"):
        return _run(cfg)


def _split(cfg: Cls2DConfig, table: LabelTable) -> Split:
    patients = {name: pid for name, pid in zip(table.names, table.patients, strict=True)}
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    return make_split(patients, seed=split_seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                      label_fraction=cfg.label_fraction, subset_seed=cfg.seed)


def _run(cfg: Cls2DConfig) -> dict:
    started = time.perf_counter()
    out, device = Path(cfg.out), resolve_device(cfg.device)
    existing = earlier_run(out, RUN_FILES, overwrite=cfg.overwrite,
                           refusal="{out} holds an earlier run ({files}); pass --overwrite or choose another --out")
    table = read_label_table(cfg.data, cfg.findings)
    split = _split(cfg, table)
    row = {n: i for i, n in enumerate(table.names)}
    parts = {k: np.array([row[n] for n in getattr(split, k)], dtype=np.int64) for k in ("train", "val", "test")}
    order = np.concatenate(list(parts.values()))
    bank = load_table_images(table, order.tolist(), cfg.progress)
    images = _Images(bank, device)
    # Positions in the bank of each part, and their labels.
    pos, start = {}, 0
    for k, idx in parts.items():
        pos[k] = np.arange(start, start + len(idx))
        start += len(idx)
    labels = torch.from_numpy(table.labels[order])
    torch.manual_seed(cfg.seed)
    model = build_classifier(len(table.findings), cfg.init, cfg.dropout, cfg.mode, cfg.trust_checkpoint).to(device)
    clear_earlier_run(out, existing)
    with atomic_write(out / "split.json", "w") as fh:
        json.dump(split.to_dict(), fh, indent=2)
    meta = {"task": "cls2d", "arch": {"model": "classifier2d", "num_classes": len(table.findings),
                                      "dropout": cfg.dropout},
            "findings": list(table.findings), "image_size": cfg.image_size, "split": split.to_dict(),
            "data": str(cfg.data), "init": cfg.init, "mode": cfg.mode, "label_fraction": cfg.label_fraction,
            "config": cfg.to_dict(), "pcrlv2_fast_version": __version__}
    if cfg.progress:
        tqdm.write(f"fine-tuning Classifier2D ({cfg.mode}, init {cfg.init}) on {len(split.train)} labelled training "
                   f"images (label fraction {cfg.label_fraction:g}), {len(split.val)} validation, {len(split.test)} "
                   f"test; findings {', '.join(table.findings)}; {device}")
    best = _train(cfg, model, images, labels, pos, device, out, meta)
    test = _test(cfg, out, images, labels, pos["test"], table.findings, device)
    summary = {"config": cfg.to_dict(), "findings": list(table.findings),
               "images": {k: len(getattr(split, k)) for k in ("train", "unlabelled", "val", "test")},
               "best_epoch": best[0], "best_metric_name": "val_mean_auc", "best_metric": best[1],
               "test": {"mean_auc": test["mean_auc"], "auc_per_class": test["auc_per_class"]},
               "wall_time_s": round(time.perf_counter() - started, 2), "device": str(device),
               "files": {k: str(out / k) for k in RUN_FILES if (out / k).exists()}}
    with atomic_write(out / "summary.json", "w") as fh:
        json.dump(nan_to_none(summary), fh, indent=2)
    return nan_to_none(summary)


def _train(cfg, model, images, labels, pos, device, out, meta) -> tuple[int, float]:
    """Epochs of BCE on augmented views; after each the validation AUC, and best.pt when it improved."""
    amp = torch.bfloat16 if cfg.precision == "bf16" else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train = pos["train"]
    batch = min(cfg.batch_size, len(train))
    steps_per_epoch = cfg.iters_per_epoch or max(1, len(train) // batch)
    total, step, best = cfg.epochs * steps_per_epoch, 0, (-1, -np.inf)
    names = meta["findings"]
    bar = tqdm(total=total, desc="finetune", unit="step", disable=not cfg.progress)
    with open(out / "metrics.jsonl", "w") as metrics:
        for epoch in range(cfg.epochs):
            model.train()
            rng = np.random.default_rng([cfg.seed, epoch, 0xC1A5])
            order = np.concatenate([rng.permutation(train) for _ in range(-(-steps_per_epoch * batch // len(train)))])
            losses = []
            for k in range(steps_per_epoch):
                index = order[k * batch:(k + 1) * batch]
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * cosine_factor(step, total)
                with _autocast(device, amp):
                    logits = model(images.train_batch(index, rng, cfg.image_size))
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels[index].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                step += 1
                bar.update(1)
            val = multilabel_auc(predict(model, images, pos["val"], cfg.image_size, amp=amp),
                                 labels[pos["val"]].numpy(), names)
            score = val["mean_auc"] if np.isfinite(val["mean_auc"]) else -float(np.mean(losses))
            row = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)),
                   "lr": optimizer.param_groups[0]["lr"], "val_mean_auc": val["mean_auc"],
                   **{f"val_auc_{n}": v for n, v in val["auc_per_class"].items()}}
            metrics.write(json.dumps(nan_to_none(row)) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", val_auc=f"{val['mean_auc']:.3f}")
            if score > best[1]:
                best = (epoch + 1, score)
                save_checkpoint(out / "best.pt", model, epoch=epoch + 1, finetune=meta)
    bar.close()
    return best


def _test(cfg, out, images, labels, index, findings, device) -> dict:
    model, _ = load_classifier(out / "best.pt")
    model.to(device)
    probs = predict(model, images, index, cfg.image_size)
    result = multilabel_auc(probs, labels[index].numpy(), findings)
    result.update({"split": "test", "n_images": len(index),
                   "positives": {f: int(labels[index][:, k].sum()) for k, f in enumerate(findings)}})
    _write_results(out, "test", result, probs, labels[index].numpy(), findings)
    return result


def _write_results(out: Path, split: str, result: dict, probs, truth, findings) -> None:
    with atomic_write(out / f"{split}_metrics.json", "w") as fh:
        json.dump(nan_to_none(result), fh, indent=2)
    try:
        from ..viz import save_roc_png
    except ImportError:
        return
    save_roc_png(out / f"{split}_roc.png", probs, truth, findings, result["auc_per_class"])


def load_classifier(path, trusted: bool = False) -> tuple[Classifier2D, dict]:
    """The network of a 2D fine-tuning checkpoint (strict) and its ``finetune`` record."""
    ckpt = read_checkpoint(path, trusted=trusted)
    meta = ckpt.get("finetune")
    if not isinstance(meta, dict) or meta.get("task") != "cls2d":
        raise CheckpointError(f"{path}: not a 2D classification checkpoint (no 'finetune' record of task cls2d); "
                              "pass the best.pt of `pcrlv2-fast finetune --task cls --dims 2`")
    model = Classifier2D(int(meta["arch"]["num_classes"]), float(meta["arch"]["dropout"]))
    state = extract_state_dict(ckpt, path)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    return model, meta


def evaluate_cls2d(checkpoint, data, out, split: str = "test", device: str = "auto", progress: bool = True,
                   trusted: bool = False) -> dict:
    """Score a 2D classification checkpoint on the images of its recorded ``split`` of ``data`` (or ``all``):
    ``<split>_metrics.json`` and ``<split>_roc.png`` in ``out``."""
    dev = resolve_device(device)
    model, meta = load_classifier(checkpoint, trusted)
    table = read_label_table(data, meta["findings"])
    row = {n: i for i, n in enumerate(table.names)}
    wanted = table.names if split == "all" else meta["split"][split]
    missing = [n for n in wanted if n not in row]
    if missing:
        raise ImageError(f"{data}: {len(missing)} of the checkpoint's {len(wanted)} {split} images are not listed "
                         f"(e.g. {missing[:3]}); pass the data it was fine-tuned on, or --split all")
    index = [row[n] for n in wanted]
    images = _Images(load_table_images(table, index, progress), dev)
    probs = predict(model.to(dev), images, np.arange(len(index)), int(meta["image_size"]))
    truth = table.labels[index]
    result = multilabel_auc(probs, truth, meta["findings"])
    result.update({"split": split, "n_images": len(index), "checkpoint": str(checkpoint), "data": str(data),
                   "positives": {f: int(truth[:, k].sum()) for k, f in enumerate(meta["findings"])}})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_results(out, split, result, probs, truth, meta["findings"])
    files = {"metrics": str(out / f"{split}_metrics.json")}
    if (out / f"{split}_roc.png").exists():
        files["roc"] = str(out / f"{split}_roc.png")
    return {**nan_to_none(result), "files": files}
