"""Pretraining configuration: one dataclass with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..data.io import MODALITIES
from ..data.loader import LOADERS
from ..nn.blocks import NETWORK_ACTS, NORMS
from ..nn.dispatch import KERNELS
from .trace import parse_window

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")
OPTIM_IMPLS = ("auto", "fused", "foreach", "loop")
# The allowed values of the configuration's option fields; the command line offers the same.
CHOICES = {"optimizer": OPTIMIZERS, "precision": PRECISIONS, "optim_impl": OPTIM_IMPLS, "norm": NORMS,
           "act": NETWORK_ACTS, "modality": MODALITIES, "loader": ("auto", *LOADERS), "kernels": KERNELS}

@dataclass
class PretrainConfig:
    data: str = ""
    out: str = "runs/pretrain"
    # 3: CT/MR volumes and the 3D network; 2: 2D images (chest X-rays; a folder or an NIH Data_Entry CSV) and the
    # 2D network (ResNet-18 encoder, train/loop2d.py).
    dims: int = 3
    # Length: `steps` (optimizer steps) wins over `epochs` when set; the cosine lr and the deep-supervision
    # weight anneal over the run's own length either way.
    epochs: int = 240
    steps: int | None = None
    # The global batch of one optimizer step: split over the processes of a torchrun launch and then into
    # `accumulate` micro-batches per process (gradient accumulation), so the recipe does not depend on the
    # number of devices.
    batch_size: int = 32
    accumulate: int = 1
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # sgd (official) | adamw
    # auto (fused on CUDA, foreach on the CPU) | fused | foreach | loop: how the optimizer updates the tensors
    optim_impl: str = "auto"
    # fp32 (TF32 off) | tf32 (fp32 with TF32 matmuls/convolutions on CUDA) | bf16 (autocast) | fp16 (autocast and
    # a gradient scaler; steps whose gradients overflow are skipped and counted)
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    # Batch-norm statistics over the batch of all processes; None: on when there are several processes.
    sync_bn: bool | None = None
    seed: int = 0
    resume: str | None = None  # a checkpoint path, or "auto" for the newest readable checkpoint in `out`, if any
    overwrite: bool = False  # start afresh in a run folder that holds an earlier run
    trust_checkpoint: bool = False  # let --resume unpickle types outside the allow-list (runs code from the file)
    width: int = 32
    norm: str = "bn"
    act: str = "relu"
    all_scales: bool = False
    pairs_per_volume: int = 16  # samples per scan per epoch (the official generates 16 crop pairs per scan)
    samples_per_image: int = 1  # 2D: samples per image per epoch (the official: each image once)
    # 2D: a torchvision ResNet-18 state_dict (e.g. ImageNet weights), an official 2D checkpoint or a whole 2D model
    # loaded before training (strict); None: random initialisation.
    encoder_weights: str | None = None
    # Every crop size and view size times this (data.geometry.CropConfig.scaled): for volumes smaller than the
    # official crops; 1 is the official geometry.
    crop_scale: float = 1.0
    workers: int = 0
    # auto (native when the C++ extension is built, else torch) | dataset (per-sample DataLoader with `workers`
    # processes) | torch | native (whole batches at once); all give the same samples.
    loader: str = "auto"
    # Batches built ahead of the step by a background thread (host-to-device copies on a side stream on CUDA);
    # 0 builds each batch in the training thread when the step needs it. The batches are the same either way.
    # None: 2 on CUDA, 0 on the CPU (there the producer competes with the step for the cores).
    prefetch: int | None = None
    loader_threads: int | None = None  # OpenMP threads of the native loader; None: torch's intra-op thread count
    # GPU memory the torch loader may fill with the volumes (GiB); None: a quarter of the free memory. Above it
    # the native loader feeds the GPU from the CPU instead.
    gpu_cache_gb: float | None = None
    # torch (plain PyTorch ops) | triton (the fused kernels of pcrlv2_fast.kernels for the conv blocks and the
    # loss; on CPU tensors they need TRITON_INTERPRET=1, otherwise the torch path runs with a logged warning)
    kernels: str = "torch"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    modality: str = "auto"  # auto | ct | mr
    spacing: float = 1.0
    skip_loss_above: float = 1000.0  # official: skip steps with loss > 1000 after epoch 10
    # Stop (after saving) when this many steps in a row had a non-finite loss or gradient; 0: never stop.
    max_nonfinite: int = 5
    save_every: int = 0  # also checkpoint every N steps (0: at each epoch end and at the end only)
    keep_checkpoints: int = 2  # checkpoint-<step>.pt files kept beside checkpoint.pt (0: checkpoint.pt only)
    log_every: int | None = None  # metrics rows (and device reads) every N steps; None: 1 on the CPU, 10 on CUDA
    tensorboard: bool = True  # event files next to metrics.jsonl, when the tensorboard package is installed
    pictures: bool = True
    profile_steps: str | None = None  # "A:B": a torch.profiler trace of steps A..B in OUT/trace.pt.trace.json
    # Labelled volumes for a frozen-encoder probe (finetune/probe.py) scored before the first step, every
    # `probe_every` steps (None: every epoch) and at the end; logged as probe rows of metrics.jsonl.
    probe: str | None = None
    probe_every: int | None = None
    probe_cases: int = 8

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
        for field, allowed in CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {self.dims}")
        if self.dims == 2:
            self._validate_2d()
        elif self.encoder_weights is not None:
            raise ValueError("--encoder-weights loads ResNet-18 weights into the 2D network: it needs --dims 2")
        positive = ("epochs", "batch_size", "accumulate", "width", "pairs_per_volume", "samples_per_image")
        for field in positive:
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 2 and self.norm == "bn":
            raise ValueError("batch_size must be >= 2: the projection BatchNorm1d layers need 2 samples per batch")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for field in ("loader_threads", "log_every"):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.gpu_cache_gb is not None and self.gpu_cache_gb < 0:
            raise ValueError(f"gpu_cache_gb must be >= 0, got {self.gpu_cache_gb}")
        if (self.probe_every is not None and self.probe_every < 1) or self.probe_cases < 2:
            raise ValueError(f"probe_every must be >= 1 and probe_cases >= 2, got {self.probe_every}, "
                             f"{self.probe_cases}")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if self.prefetch is not None and self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        for field in ("max_nonfinite", "save_every", "keep_checkpoints"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.profile_steps is not None:
            parse_window(self.profile_steps)
        if self.batch_size % self.accumulate:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of accumulate {self.accumulate}")
        return self

    def _validate_2d(self) -> None:
        """The options the 2D network and data path do not have."""
        unsupported = {"kernels": ("torch", "the fused Triton kernels are 3D"),
                       "crop_scale": (1.0, "2D views have the official sizes"),
                       "probe": (None, "the frozen-encoder probe segments 3D volumes")}
        for field, (allowed, why) in unsupported.items():
            if getattr(self, field) != allowed:
                raise ValueError(f"--{field.replace('_', '-')} {getattr(self, field)} is not available with --dims 2: "
                                 f"{why}")
        if self.loader == "native":
            raise ValueError("--loader native is not available with --dims 2 (its C++ kernels are 3D): choose auto, "
                             "dataset, torch or dali")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
