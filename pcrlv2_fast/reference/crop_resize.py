"""Plain-PyTorch reference of ``crop_resize``: cut boxes out of one volume, window them, resize trilinearly.

This is the semantics the ``native`` C++ kernel (csrc/crop_resize.cpp) reproduces element-wise: per box,
the crop is converted to float32, mapped through the intensity window ``clip((v - lo) / (hi - lo), 0, 1)``
*before* interpolation, then resized with ``F.interpolate(mode="trilinear", align_corners=False)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["reference_crop_resize"]


def reference_crop_resize(
    volume: np.ndarray,
    boxes,
    out_size: Sequence[int],
    window: tuple[float, float],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Crops of ``volume`` (X, Y, Z) at ``boxes`` (N, 6: x0, y0, z0, sx, sy, sz) as (N, 1, *out_size)."""
    lo, hi = window
    crops = []
    for x0, y0, z0, sx, sy, sz in np.asarray(boxes, dtype=np.int64).reshape(-1, 6).tolist():
        crop = torch.from_numpy(np.array(volume[x0:x0 + sx, y0:y0 + sy, z0:z0 + sz])).float()
        crop = ((crop - lo) / (hi - lo)).clamp(0, 1)
        crops.append(F.interpolate(crop[None, None], size=tuple(out_size), mode="trilinear", align_corners=False))
    if not crops:
        return torch.empty((0, 1, *out_size), dtype=out_dtype)
    return torch.cat(crops).to(out_dtype)
