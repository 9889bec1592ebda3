"""The ``dali`` backend of 2D pretraining: chest X-ray batches decoded, cut and resized by an NVIDIA DALI pipeline
(nvJPEG and the GPU on CUDA, the CPU here), finished in torch.

:class:`DaliLoader2D` gives the batches of :class:`~pcrlv2_fast.data.dataset2d.BatchLoader2D` for the same dataset,
seed and epoch, from the same draws (``PretrainDataset2D.sample_params``). Per batch the host reads each item's
file (encoded bytes, as the official dataset opens the file per item); one pipeline, built once per loader, then
per item:

1. ``fn.decoders.image`` to one grey channel (``device="mixed"`` on CUDA: nvJPEG / the GPU PNG path);
2. per view (2 global, 6 local): ``fn.slice`` of the view's box (integer anchor and shape: exact) and
   ``fn.resize`` to the view size, linear, ``antialias=False``, float32: the sample positions of
   ``F.interpolate(mode="bilinear", align_corners=False)`` (measured to 3e-6 of the [0, 1] range).

Rotation and flip (a nearest-neighbour gather from the resized view), blur, jitter, normalisation and cutout run in
torch on the output device (``views2d.views_from_resized``, the code every 2D loader runs): DALI's warp applies its
own pixel-centre rounding to the nearest-neighbour rotation, its Gaussian pads by reflection where the reference
replicates the border, and its brightness/contrast op is not torchvision's blend with the image mean.

Only 8-bit images (an ImageBank of uint8) are accepted: 16-bit PNGs and DICOMs are scaled by their own range by
``images2d.read_image``, which DALI's decoder does not do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .dali import _dali
from .dataset2d import PretrainDataset2D, draw_batch_2d
from .loader import Batch
from .views2d import views_from_resized

__all__ = ["DaliLoader2D"]


class _Pipeline2D:
    """One DALI pipeline: encoded image -> grey -> per view slice + resize; outputs (S, S, 1) float32 per view."""

    def __init__(self, sizes: Sequence[int], max_batch: int, num_threads: int, device_id: int | None):
        d = _dali()
        fn, types = d["fn"], d["types"]
        self.sizes, self.max_batch, self.gpu = list(sizes), int(max_batch), device_id is not None
        self._feed_ndarray = d["feed_ndarray"]
        self.pipe = d["Pipeline"](batch_size=self.max_batch, num_threads=num_threads, device_id=device_id,
                                  prefetch_queue_depth=1, exec_dynamic=True)
        with self.pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            image = fn.decoders.image(encoded, device="mixed" if self.gpu else "cpu", output_type=types.GRAY)
            outputs = []
            for k, size in enumerate(self.sizes):
                anchor = fn.external_source(name=f"anchor{k}", dtype=types.INT32)
                shape = fn.external_source(name=f"shape{k}", dtype=types.INT32)
                crop = fn.slice(image, anchor, shape, axis_names="HW")
                outputs.append(fn.resize(crop, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=False,
                                         dtype=types.FLOAT))
            self.pipe.set_outputs(*outputs)
        self.pipe.build()

    def run(self, encoded: list[np.ndarray], boxes: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        """``boxes`` (B, n_views, 4) as (top, left, h, w): per view slot a (B, S, S) float32 tensor (0-255)."""
        self.pipe.feed_input("encoded", encoded)
        for k in range(len(self.sizes)):
            self.pipe.feed_input(f"anchor{k}", [b[:2].astype(np.int32) for b in boxes[:, k]])
            self.pipe.feed_input(f"shape{k}", [b[2:].astype(np.int32) for b in boxes[:, k]])
        outputs = self.pipe.run()
        stream = torch.cuda.current_stream(device).cuda_stream if self.gpu else None
        result = []
        for out, size in zip(outputs, self.sizes, strict=True):
            t = torch.empty((len(encoded), size, size, 1), dtype=torch.float32, device=device)
            self._feed_ndarray(out.as_tensor(), t, cuda_stream=stream)
            result.append(t.view(len(encoded), size, size))
        return result


def _to(params: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in params.items()}


class DaliLoader2D:
    """Batches of ``dataset``'s items (the dict of ``BatchLoader2D.batch``) built from ``files`` (the dataset's
    images, in its order; default the bank's paths) by a DALI pipeline on ``device`` ("cpu" or "cuda[:N]") and
    finished in torch there."""

    def __init__(self, dataset: PretrainDataset2D, files: Sequence[str | Path] | None = None,
                 device: str | torch.device = "cpu", num_threads: int | None = None, batch_size: int = 8):
        _dali()
        files = dataset.bank.paths if files is None else files
        if files is None:
            raise ValueError("DaliLoader2D decodes the image files: the images were not read from files")
        if len(files) != len(dataset.bank):
            raise ValueError(f"DaliLoader2D needs one file per image of the dataset: {len(files)} files for "
                             f"{len(dataset.bank)} images")
        if dataset.bank.pixels.dtype != np.uint8:
            raise ValueError("--loader dali reads 8-bit PNG/JPEG images; these images are 16-bit or DICOM (scaled by "
                             "their own range): use --loader torch")
        self.dataset, self.files = dataset, [Path(f) for f in files]
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"DaliLoader2D runs on 'cpu' or 'cuda', got device {self.device}")
        self.num_threads = num_threads or torch.get_num_threads()
        self.batch_size = int(batch_size)
        self._pipe: _Pipeline2D | None = None

    def _pipeline(self, n: int) -> _Pipeline2D:
        if self._pipe is None or self._pipe.max_batch < n:
            cfg = self.dataset.views
            sizes = [cfg.global_size] * 2 + [cfg.local_size] * cfg.n_local
            self._pipe = _Pipeline2D(sizes, max(n, self.batch_size), self.num_threads,
                                     self.device.index if self.device.type == "cuda" else None)
        return self._pipe

    def batch(self, indices: Sequence[int]) -> Batch:
        cfg = self.dataset.views
        d = draw_batch_2d(self.dataset, indices)
        b = len(d.image_index)
        encoded = [np.fromfile(self.files[i], dtype=np.uint8) for i in d.image_index]
        resized = [t.mul_(1.0 / 255.0) for t in self._pipeline(b).run(encoded, d.boxes, self.device)]
        spatial, x = views_from_resized(torch.cat(resized[:2]), _to(d.global_params, self.device))
        if cfg.n_local:
            local = torch.stack(resized[2:], dim=1).reshape(b * cfg.n_local, cfg.local_size, cfg.local_size)
            loc = views_from_resized(local, _to(d.local_params, self.device))[1]
        else:
            loc = torch.empty((0, 3, cfg.local_size, cfg.local_size), device=self.device)
        return d.batch(spatial, x, loc)

    def batches(self, batch_indices: Iterable[Sequence[int]]) -> Iterator[Batch]:
        for indices in batch_indices:
            yield self.batch(indices)
