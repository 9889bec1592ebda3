"""Pretraining configuration: one dataclass with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class PretrainConfig:
    data: str = ""
    out: str = "runs/pretrain"
    # Length: `steps` (optimizer steps) wins over `epochs` when set; the cosine lr and the deep-supervision
    # weight anneal over the run's own length either way.
    epochs: int = 240
    steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # sgd (official) | adamw
    precision: str = "fp32"  # fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    resume: str | None = None  # a checkpoint path, or "auto" for RUN_DIR/checkpoint.pt when present
    overwrite: bool = False  # start afresh in a run folder that holds an earlier run
    width: int = 32
    norm: str = "bn"
    act: str = "relu"
    all_scales: bool = False
    pairs_per_volume: int = 16  # samples per scan per epoch (the official generates 16 crop pairs per scan)
    workers: int = 0
    # auto (native when the C++ extension is built, else torch) | dataset (per-sample DataLoader with `workers`
    # processes) | torch | native (whole batches at once); all give the same samples.
    loader: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    modality: str = "auto"  # auto | ct | mr
    spacing: float = 1.0
    skip_loss_above: float = 1000.0  # official: skip steps with loss > 1000 after epoch 10
    save_every: int = 0  # also checkpoint every N steps (0: at each epoch end and at the end only)
    log_every: int = 1
    pictures: bool = True

    PRESETS = {
        # The official recipe: 240 epochs, batch 32, SGD 1e-3, full width.
        "official": {},
        # A few minutes on a laptop CPU: narrow network, mixed precision, small batches.
        "demo": dict(width=8, batch_size=4, steps=180, lr=3e-2, precision="bf16", channels_last=True,
                     pairs_per_volume=16, overwrite=True),
        # Seconds: for tests.
        "tiny": dict(width=2, batch_size=2, steps=2, pairs_per_volume=2, pictures=False),
    }

    @classmethod
    def from_name(cls, name: str, **overrides) -> PretrainConfig:
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def validate(self) -> PretrainConfig:
        choices = {"optimizer": ("sgd", "adamw"), "precision": ("fp32", "bf16", "fp16"),
                   "norm": ("bn", "gn", "in"), "act": ("relu", "prelu", "elu"), "modality": ("auto", "ct", "mr"),
                   "loader": ("auto", "dataset", "torch", "native", "dali")}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        positive = ("epochs", "batch_size", "width", "pairs_per_volume", "log_every")
        for field in positive:
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 2 and self.norm == "bn":
            raise ValueError("batch_size must be >= 2: the projection BatchNorm1d layers need 2 samples per batch")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
