"""The 2D pretraining run (chest X-rays, ``--dims 2``): the 3D trainer's loop, step, checkpoints, metrics,
precision, channels-last, compile and DDP, with the 2D data and network in place of the volumes and the 3D U-Net.

Data: the images of a folder or an NIH Data_Entry CSV are read once into an ImageBank (every process reads them);
views are cut on the fly by the per-sample dataset (``--loader dataset``), whole batches at once on the run's
device (``torch``, the default) or by NVIDIA DALI pipelines that decode the files (``dali``); the same samples.
Network: :class:`~pcrlv2_fast.models.NonSkipUNet2D` (random initialisation, or ``--encoder-weights``; the official
code downloaded ImageNet weights at build time), objective: the same :class:`PCRLv2Loss` over its five decoder
scales, beta annealed over the run's own length.
"""

from __future__ import annotations

import sys

import torch

from ..checkpoint import load_pretrained_2d
from ..data.dataset2d import BatchLoader2D, PretrainDataset2D
from ..data.images2d import ImageBank, load_images
from ..data.loader import resolve_loader
from ..data.views2d import ViewConfig2D
from ..losses import PCRLv2Loss
from ..models import NonSkipUNet2D
from . import distributed as D
from .loop import Pretrainer
from .loop import pretrain as pretrain_3d
from .optim import build_optimizer, optimizer_impl
from .step import set_float32_precision

__all__ = ["Pretrainer2D", "pretrain"]


class Pretrainer2D(Pretrainer):
    """:class:`Pretrainer` for 2D images; ``images`` (an ImageBank) replaces reading ``cfg.data``."""

    views = ViewConfig2D()  # the official view sizes; a subclass may set smaller ones (the tests do)

    def __init__(self, cfg, images: ImageBank | None = None):
        if cfg.dims != 2:
            raise ValueError(f"Pretrainer2D runs --dims 2, got dims={cfg.dims}")
        super().__init__(cfg, images)

    def _load_volumes(self) -> ImageBank:
        return load_images(self.cfg.data, progress=self.dist.is_main)

    def _build_data(self, images: ImageBank) -> None:
        cfg = self.cfg
        self.dataset = PretrainDataset2D(images, self.views, seed=cfg.seed, samples_per_image=cfg.samples_per_image)
        self.loader_name = "torch" if cfg.loader == "auto" else resolve_loader(cfg.loader)
        if self.loader_name == "dali":
            from ..data.dali2d import DaliLoader2D

            self.batch_loader = DaliLoader2D(self.dataset, device=self.device, batch_size=self.micro_batch)
        elif self.loader_name == "torch":
            self.batch_loader = BatchLoader2D(self.dataset, self._bank_device(images))
        else:
            self.batch_loader = None  # the per-sample dataset through a DataLoader
        if self.dist.is_main:
            print(f"2D data: {len(images)} images from {cfg.data or 'memory'}, up to {images.pixels.shape[2]} x "
                  f"{images.pixels.shape[1]} pixels ({images.pixels.dtype}), loader {self.loader_name}",
                  file=sys.stderr)
        self._set_length(f"{len(images)} images x {cfg.samples_per_image}", "--samples-per-image")

    def _bank_device(self, images: ImageBank) -> torch.device:
        """The torch loader keeps the images on the GPU when they fit --gpu-cache-gb (default a quarter of the free
        memory); otherwise it builds the views on the CPU and the trainer copies them over. The choice is printed."""
        if self.device.type != "cuda":
            return self.device
        budget = self._gpu_cache_budget()
        need = images.pixels.nbytes
        fits = need <= budget
        if self.dist.is_main:
            print(f"2D images: {need / 2**30:.2f} GiB, GPU cache budget {budget / 2**30:.2f} GiB: views built on "
                  f"{'the GPU' if fits else 'the CPU (raise --gpu-cache-gb to build them on the GPU)'}",
                  file=sys.stderr)
        return self.device if fits else torch.device("cpu")

    def _build_model(self) -> None:
        cfg = self.cfg
        set_float32_precision(cfg.precision)
        torch.manual_seed(cfg.seed)
        model = NonSkipUNet2D()
        if cfg.encoder_weights:
            load_pretrained_2d(cfg.encoder_weights, model, trusted=cfg.trust_checkpoint)
        if self.sync_bn:
            model = D.convert_sync_batchnorm(model, self.device)
        self.fused_blocks = {"conv": "0/0", "norm_act": "0/0"}  # the fused kernels are 3D
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(self.device).to(memory_format=self.memory_format)
        self.optimizer = build_optimizer(cfg, self.model)
        self.optim_impl = optimizer_impl(cfg.optim_impl, self.device)
        self.loss_fn = PCRLv2Loss(total_epochs=self.total_epochs, n_local=self.dataset.views.n_local,
                                  all_scales=cfg.all_scales, kernels="torch")

    def _pictures(self, last) -> dict[str, str]:
        """restoration.png (one row: input, target, restoration, the five deep-supervision outputs) and
        loss_curve.png."""
        try:
            from ..viz import save_loss_curve_png, save_restoration_png_2d
        except ImportError as exc:
            print(f"note: no pictures ({exc}); pip install matplotlib to get them", file=sys.stderr)
            return {}
        s = {k: (v.detach().float().cpu() if torch.is_tensor(v) else [m[0].detach().float().cpu() for m in v])
             for k, v in last.sample.items()}
        save_restoration_png_2d(self.out / "restoration.png", s["x1"], s["gt"], s["restoration"], s["masks"],
                                title=f"step {self.step}")
        save_loss_curve_png(self.out / "metrics.jsonl", self.out / "loss_curve.png")
        return {"restoration": str(self.out / "restoration.png"), "loss_curve": str(self.out / "loss_curve.png")}


def pretrain(cfg, data=None) -> dict:
    """Run ``cfg``: the 3D trainer, or with ``dims=2`` the 2D one; ``data`` replaces reading ``cfg.data`` (volumes
    in 3D, an ImageBank in 2D)."""
    if cfg.dims != 2:
        return pretrain_3d(cfg, data)
    trainer = Pretrainer2D(cfg, data)
    try:
        return trainer.run()
    finally:
        trainer.close()
