"""The label-efficiency protocol: does PCRLv2 pretraining make fine-tuning better when labels are scarce?

On a labelled collection (one subject per case, e.g. MSD Task04 hippocampus):

1. a fixed split by subject (``split_seed``): ``n_test`` test subjects, ``n_val`` validation subjects, the rest the
   training pool;
2. PCRLv2 pretraining on the images of the training pool only (labels unused; validation and test subjects never
   seen), for a stated number of steps;
3. fine-tuning (``finetune``, skip U-Net) with ``n`` labelled training subjects for each budget ``n`` and seed, from
   random initialisation and from the pretrained encoder, with the same steps for every run; the labelled subjects
   are drawn from the pool by the fine-tuning seed (nested across budgets); model selection on validation only;
4. test Dice per class of every run's best-validation checkpoint, gathered into rows (``report.py`` summarises them).

Every stage keeps its results in OUT and is skipped when run again with the same settings, so an interrupted
benchmark continues where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from ..data import CropConfig, preprocess
from ..finetune import FinetuneConfig, finetune
from ..finetune.data import find_cases
from ..finetune.split import Split, make_split
from ..train import PretrainConfig, pretrain
from ..utils.io import atomic_write

INITS = ("random", "pcrlv2")


@dataclass
class TransferConfig:
    data: str
    out: str
    subjects: int | None = None  # the first N cases by id (None: all)
    n_test: int = 100
    n_val: int = 20
    budgets: tuple[int, ...] = (8, 16, 32)
    seeds: tuple[int, ...] = (0, 1, 2)
    split_seed: int = 0
    width: int = 16
    # pretraining
    crop_scale: float = 0.4
    pretrain_steps: int = 2400
    pretrain_batch: int = 16
    pretrain_lr: float = 1e-2
    pretrain_precision: str = "bf16"
    # fine-tuning
    epochs: int = 4
    iters_per_epoch: int = 25
    batch_size: int = 4
    patch_size: tuple[int, int, int] = (32, 48, 32)
    lr: float = 1e-3
    precision: str = "bf16"
    class_names: tuple[str, ...] | None = None  # foreground classes in reports (default: class_1, ...)
    device: str = "auto"
    progress: bool = True
    extra_inits: dict[str, str] = field(default_factory=dict)  # name -> checkpoint (e.g. a cross-domain encoder)

    QUICK = dict(subjects=16, n_test=4, n_val=2, budgets=(2, 4), seeds=(0, 1), width=4, pretrain_steps=4,
                 pretrain_batch=4, epochs=2, iters_per_epoch=2, batch_size=2, patch_size=(16, 16, 16))

    @classmethod
    def quick(cls, **overrides) -> TransferConfig:
        """The same protocol at toy size (a test runs it in about a minute)."""
        return cls(**{**cls.QUICK, **overrides})

    def validate(self) -> TransferConfig:
        if min(self.n_test, self.n_val) < 1 or not self.budgets or not self.seeds or min(self.budgets) < 1:
            raise ValueError(f"n_test, n_val and every budget must be >= 1, with at least one budget and seed; got "
                             f"{self.n_test}, {self.n_val}, {self.budgets}, {self.seeds}")
        if self.pretrain_steps < 1 or self.epochs < 1 or self.iters_per_epoch < 1:
            raise ValueError("pretrain_steps, epochs and iters_per_epoch must be >= 1")
        unknown = set(self.extra_inits) & set(INITS)
        if unknown:
            raise ValueError(f"extra init names must differ from {INITS}, got {sorted(unknown)}")
        return self


# ------------------------------------------------------------------------------------------------ split
@dataclass(frozen=True)
class Subjects:
    """The cases of the benchmark (``cases.json``, the data fine-tuning reads), the fixed split and its pool."""

    cases_file: Path
    split: Split
    images: dict[str, Path]  # case id -> image file

    @property
    def pool(self) -> tuple[str, ...]:
        return tuple(sorted(self.split.train + self.split.unlabelled))


def fixed_split(cfg: TransferConfig, out: Path) -> Subjects:
    """The benchmark's cases (written to OUT/cases.json) and their split by subject: test, validation, pool."""
    cases, _ = find_cases(cfg.data, "seg")
    cases = sorted(cases, key=lambda c: c.case_id)[: cfg.subjects]
    n = len({c.patient for c in cases})
    if n < cfg.n_test + cfg.n_val + max(cfg.budgets):
        raise ValueError(f"{cfg.data}: {n} subjects cannot hold {cfg.n_test} test + {cfg.n_val} validation subjects "
                         f"and a pool of {max(cfg.budgets)} labelled ones")
    patients = {c.case_id: c.patient for c in cases}
    split = make_split(patients, seed=cfg.split_seed, val_fraction=cfg.n_val / n, test_fraction=cfg.n_test / n)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"id": c.case_id, "image": [str(p.resolve()) for p in c.images], "label": str(Path(c.label).resolve()),
             "patient": c.patient} for c in cases]
    with atomic_write(out / "cases.json", "w") as f:
        json.dump(rows, f, indent=1)
    # The validation subjects, for the probe that follows pretraining (test subjects are never looked at).
    with atomic_write(out / "val_cases.json", "w") as f:
        json.dump([r for r in rows if r["id"] in set(split.val)], f, indent=1)
    with atomic_write(out / "split.json", "w") as f:
        json.dump(split.to_dict(), f, indent=1)
    return Subjects(out / "cases.json", split, {c.case_id: c.images[0] for c in cases})


# ------------------------------------------------------------------------------------------------ stages
def _stage(folder: Path, settings: dict) -> str:
    """"finished", "started" (interrupted) or "new": what ``folder`` holds of a stage run with these settings."""
    record = folder / "transfer_stage.json"
    if not record.is_file():
        return "new"
    found = json.loads(record.read_text())
    if found["settings"] != settings:
        return "new"
    return "finished" if found["finished"] else "started"


def _record(folder: Path, settings: dict, finished: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / "transfer_stage.json", "w") as f:
        json.dump({"settings": settings, "finished": finished}, f, indent=1)


def pretrain_pool(cfg: TransferConfig, subjects: Subjects, out: Path) -> dict:
    """PCRLv2 on the pool's images only; returns the pretraining summary (steps, samples, loss, checkpoint)."""
    folder = out / "pretrain"
    train = PretrainConfig.from_name(
        "official", data=str(folder / "cache"), out=str(folder), width=cfg.width, crop_scale=cfg.crop_scale,
        steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr, precision=cfg.pretrain_precision,
        channels_last=cfg.pretrain_precision != "fp32", device=cfg.device, seed=cfg.split_seed, tensorboard=False,
        probe=str(out / "val_cases.json"), probe_every=max(1, cfg.pretrain_steps // 10))
    settings = {"pool": list(subjects.pool), **train.to_dict()}
    stage = _stage(folder, settings)
    if stage != "finished":
        started = stage == "started"
        _record(folder, settings, finished=False)
        report = preprocess([subjects.images[c] for c in subjects.pool], folder / "cache", progress=cfg.progress,
                            min_shape=CropConfig().scaled(cfg.crop_scale).min_volume)
        if report.failed:
            raise ValueError(f"pool images that could not be preprocessed: {[r.reason for r in report.failed][:3]}")
        pretrain(replace(train, resume="auto" if started else None, overwrite=not started))
        _record(folder, settings, finished=True)
    return _pretrain_summary(folder)


def _pretrain_summary(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r for r in rows if "loss" in r]
    config = json.loads((folder / "config.json").read_text())
    return {"checkpoint": str(folder / "checkpoint.pt"), "steps": summary["steps"], "probe_dice": summary["probe_dice"],
            "samples": summary["steps"] * config["batch_size"], "samples_per_s": summary["samples_per_s"],
            "first_loss": losses[0]["loss"] if losses else None,
            "last_loss": sum(r["loss"] for r in losses[-10:]) / max(1, len(losses[-10:])) if losses else None}


def finetune_runs(cfg: TransferConfig, subjects: Subjects, inits: dict[str, str], out: Path) -> list[dict]:
    """Every (init, budget, seed) fine-tuning run; one row each with the test Dice of its best-validation model."""
    pool = len(subjects.pool)
    n = len(subjects.split.train + subjects.split.unlabelled + subjects.split.val + subjects.split.test)
    runs = [(name, budget, seed) for budget in cfg.budgets for seed in cfg.seeds for name in inits]
    rows = []
    for name, budget, seed in tqdm(runs, desc="fine-tuning", unit="run", disable=not cfg.progress):
        folder = out / "finetune" / f"{name}-n{budget}-seed{seed}"
        ft = FinetuneConfig.from_name(
            "cpu", task="seg", data=str(subjects.cases_file), out=str(folder), init=inits[name], width=cfg.width,
            seed=seed, split_seed=cfg.split_seed, val_fraction=cfg.n_val / n, test_fraction=cfg.n_test / n,
            label_fraction=budget / pool, epochs=cfg.epochs, iters_per_epoch=cfg.iters_per_epoch,
            batch_size=cfg.batch_size, patch_size=tuple(cfg.patch_size), lr=cfg.lr, precision=cfg.precision,
            class_names=cfg.class_names, device=cfg.device, progress=False, overwrite=True)
        settings = ft.to_dict()
        if _stage(folder, settings) != "finished":
            _record(folder, settings, finished=False)
            finetune(ft)
            _record(folder, settings, finished=True)
        rows.append(_finetune_row(folder, name, budget, seed, subjects.split))
    return rows


def _finetune_row(folder: Path, name: str, budget: int, seed: int, fixed: Split) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    split = json.loads((folder / "split.json").read_text())
    if (sorted(split["test"]), sorted(split["val"])) != (sorted(fixed.test), sorted(fixed.val)):
        raise RuntimeError(f"{folder}: the run's test/validation subjects differ from the benchmark's fixed split")
    if len(split["train"]) != budget:
        raise RuntimeError(f"{folder}: {len(split['train'])} labelled subjects instead of {budget}")
    test = summary["test"]
    return {"init": name, "labelled": budget, "seed": seed, "test_mean_dice": test["mean_dice"],
            "test_dice_per_class": test["dice_per_class"], "best_val_dice": summary["best_metric"],
            "best_epoch": summary["best_epoch"], "wall_s": summary["wall_time_s"], "train_subjects": split["train"]}


def run_transfer(cfg: TransferConfig) -> dict:
    """The whole protocol; returns {"config", "split", "pretrain", "rows"} and writes OUT/transfer.json."""
    cfg.validate()
    out = Path(cfg.out)
    subjects = fixed_split(cfg, out)
    pretrained = pretrain_pool(cfg, subjects, out)
    inits = {"random": "random", "pcrlv2": pretrained["checkpoint"], **cfg.extra_inits}
    rows = finetune_runs(cfg, subjects, inits, out)
    result = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
              "split": {"test": len(subjects.split.test), "val": len(subjects.split.val), "pool": len(subjects.pool)},
              "pretrain": pretrained, "rows": rows}
    with atomic_write(out / "transfer.json", "w") as f:
        json.dump(result, f, indent=1)
    return result


