"""PCRLv2's 2D views (chest X-rays), drawn on the fly: two global views, their restoration target, six local views.

The official chain (``train_2d.py``, torchvision on PIL images), per view:
RandomResizedCrop(size, scale) -> rotation +-10 degrees (nearest, fill 0) -> horizontal flip p=0.5 ->
grayscale p=0.2 -> Gaussian blur p=0.5 (sigma ~ U(0.1, 2)) -> colour jitter (0.4, 0.4, 0.4, 0.4, in a random
order) -> ImageNet normalisation -> (global views) cutout of 3 holes of 32 pixels. Global views are 224 pixels
(scale 0.3-1), local views 96 (scale 0.05-0.3). The target is global view 1 after the spatial transforms,
normalised, before the appearance chain.

Here the chain runs on one grayscale channel in float32 and is expanded to the network's three normalised channels
at the end. Every draw of the official chain is made, in its order, from one numpy generator per item; the
grayscale, saturation and hue steps leave an image with three equal channels (what the official code makes of a
grayscale X-ray) unchanged, so they are drawn and not applied. Departures, all on the float path: crops are
resized bilinearly without antialiasing (``F.interpolate``, align_corners=False; PIL's bilinear filter widens
its support when shrinking), blur is a Gaussian truncated at 3 sigma (PIL approximates one with box filters), and
no step rounds to 8 bits in between.

Two implementations, the same numbers from the same parameters (tested element-wise):
- :func:`reference_view`: one view, op after op, as the chain above reads (the per-sample dataset);
- :func:`batched_views`: every view of a batch at once from an :class:`~pcrlv2_fast.data.images2d.ImageBank` on
  any device: on a GPU crop, resize, rotation and flip are one gather per output pixel (four bilinear reads from
  the bank); on a CPU each crop is resized by ``F.interpolate`` and rotation and flip are one gather from the
  resized views; blur is one grouped convolution, jitter, normalisation and cutout elementwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ViewConfig2D", "batched_views", "draw_view", "draw_views",
           "normalize", "random_resized_box", "reference_view", "stack_params", "views_from_resized"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_SIGMA = 2.0
BLUR_RADIUS = math.ceil(3 * MAX_SIGMA)  # taps on each side of the widest blur kernel


@dataclass(frozen=True)
class ViewConfig2D:
    """The official 2D view recipe."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 6
    global_scale: tuple[float, float] = (0.3, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.3)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    degrees: float = 10.0
    flip_p: float = 0.5
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, MAX_SIGMA)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4)  # brightness, contrast, saturation, hue
    cutout_holes: int = 3
    cutout_size: int = 32

    def __post_init__(self):
        for name in ("global_size", "local_size"):
            if getattr(self, name) % 32 or getattr(self, name) < 32:
                raise ValueError(f"{name} must be a positive multiple of 32 (the network divides by 32), got "
                                 f"{getattr(self, name)}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1] <= MAX_SIGMA:
            raise ValueError(f"blur_sigma must lie in (0, {MAX_SIGMA}], got {self.blur_sigma}")


def random_resized_box(rng: np.random.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w), ten tries then a centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def draw_view(rng: np.random.Generator, height: int, width: int, cfg: ViewConfig2D, is_global: bool) -> dict:
    """One view's parameters, drawn in the official chain's order."""
    size = cfg.global_size if is_global else cfg.local_size
    box = random_resized_box(rng, height, width, cfg.global_scale if is_global else cfg.local_scale, cfg.ratio)
    angle = rng.uniform(-cfg.degrees, cfg.degrees)
    flip = rng.random() < cfg.flip_p
    gray = rng.random() < cfg.gray_p  # no effect on a grayscale image
    blur = rng.random() < cfg.blur_p
    sigma = rng.uniform(*cfg.blur_sigma) if blur else 0.0
    order = rng.permutation(4)  # brightness, contrast, saturation, hue, in torchvision's random order
    b, c, s, h = cfg.jitter
    brightness = rng.uniform(1 - b, 1 + b)
    contrast = rng.uniform(1 - c, 1 + c)
    saturation = rng.uniform(1 - s, 1 + s)  # saturation and hue: no effect on a grayscale image
    hue = rng.uniform(-h, h)
    holes = np.zeros((cfg.cutout_holes if is_global else 0, 4), dtype=np.int64)
    half = cfg.cutout_size // 2
    for k in range(len(holes)):
        y, x = int(rng.integers(0, size)), int(rng.integers(0, size))
        holes[k] = (max(y - half, 0), min(y + half, size), max(x - half, 0), min(x + half, size))
    contrast_first = list(order).index(1) < list(order).index(0)
    # gray, saturation, hue and order are kept for the official chain (benchmarks/official_2d.py); the grayscale
    # chain here needs only contrast_first.
    return {"box": np.array(box, dtype=np.int64), "angle": float(angle), "flip": bool(flip), "sigma": float(sigma),
            "brightness": float(brightness), "contrast": float(contrast), "contrast_first": bool(contrast_first),
            "holes": holes, "gray": bool(gray), "saturation": float(saturation), "hue": float(hue),
            "order": order.astype(np.int64)}


def draw_views(rng: np.random.Generator, height: int, width: int, cfg: ViewConfig2D) -> tuple[list[dict], list[dict]]:
    """An item's two global and ``n_local`` local views' parameters."""
    return ([draw_view(rng, height, width, cfg, True) for _ in range(2)],
            [draw_view(rng, height, width, cfg, False) for _ in range(cfg.n_local)])


def stack_params(views: list[dict]) -> dict[str, torch.Tensor]:
    """Per-view parameter dicts as tensors with a leading view axis."""
    out = {}
    for key in views[0]:
        values = [v[key] for v in views]
        if key in ("box", "holes", "order"):
            out[key] = torch.from_numpy(np.stack(values))
        elif key in ("flip", "contrast_first", "gray"):
            out[key] = torch.tensor(values, dtype=torch.bool)
        else:
            out[key] = torch.tensor(values, dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------- shared pieces
def _rotation_source(size: int, angle: torch.Tensor, flip: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each output pixel of views (V,) of ``size``: the integer (row, column) of the resized crop it shows
    after the rotation by ``angle`` degrees about the centre (nearest) and the flip; (V, size, size) each."""
    grid = torch.arange(size, dtype=torch.float32, device=device)
    c = (size - 1) / 2
    rows = grid.view(1, -1, 1) - c
    cols = torch.where(flip.view(-1, 1, 1), (size - 1 - grid).view(1, 1, -1), grid.view(1, 1, -1)) - c
    theta = torch.deg2rad(angle.to(device)).view(-1, 1, 1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    src_col = cos * cols - sin * rows + c
    src_row = sin * cols + cos * rows + c
    return torch.round(src_row).long(), torch.round(src_col).long()


def _source_index(dst: torch.Tensor, length: torch.Tensor, size: int):
    """F.interpolate's bilinear source positions (align_corners=False) of output indices ``dst`` into an input
    of ``length`` (per view, broadcast): (lower index, upper index, weight of the upper)."""
    scale = length.float() / size
    src = ((dst.float() + 0.5) * scale - 0.5).clamp_min(0.0)
    lo = src.floor().long()
    lo = torch.minimum(lo, length - 1)
    return lo, torch.minimum(lo + 1, length - 1), src - lo.float()


def _gaussian_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """(V, 2 * BLUR_RADIUS + 1) normalised Gaussian taps truncated at ceil(3 sigma); sigma 0: the identity."""
    x = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=torch.float32, device=sigma.device)
    s = sigma.float().view(-1, 1)
    radius = torch.ceil(3 * s)
    taps = torch.exp(-(x**2) / (2 * s.clamp_min(1e-6) ** 2)) * (x.abs() <= radius)
    taps = torch.where(s > 0, taps, (x == 0).float())
    return taps / taps.sum(dim=1, keepdim=True)


def _jitter(x: torch.Tensor, brightness, contrast, contrast_first) -> torch.Tensor:
    """torchvision's brightness and contrast adjustments (each clamped to [0, 1]) in each view's order; x (V, S, S)."""
    b, c = brightness.view(-1, 1, 1), contrast.view(-1, 1, 1)
    first = contrast_first.view(-1, 1, 1)

    def bright(t):
        return (t * b).clamp(0.0, 1.0)

    def contr(t):
        return (c * t + (1 - c) * t.mean(dim=(-2, -1), keepdim=True)).clamp(0.0, 1.0)

    x = torch.where(first, contr(x), bright(x))
    return torch.where(first, bright(x), contr(x))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(V, S, S) grayscale in [0, 1] -> (V, 3, S, S) ImageNet-normalised (the grey replicated into RGB)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.unsqueeze(1) - mean) / std


def _cutout_mask(holes: torch.Tensor, size: int) -> torch.Tensor:
    """(V, size, size) float mask, 0 inside the holes (V, K, 4: y0, y1, x0, x1)."""
    grid = torch.arange(size, device=holes.device)
    rows = (grid.view(1, 1, -1) >= holes[..., 0:1]) & (grid.view(1, 1, -1) < holes[..., 1:2])  # (V, K, S)
    cols = (grid.view(1, 1, -1) >= holes[..., 2:3]) & (grid.view(1, 1, -1) < holes[..., 3:4])
    inside = (rows.unsqueeze(-1) & cols.unsqueeze(-2)).any(dim=1)
    return (~inside).float()


# ------------------------------------------------------------------------------------------ reference
def reference_view(image: torch.Tensor, p: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One view of ``image`` (H, W) float32 in [0, 1], op after op: (spatial (size, size) in [0, 1], the network
    input (3, size, size))."""
    top, left, h, w = (int(v) for v in p["box"])
    crop = image[top:top + h, left:left + w]
    resized = F.interpolate(crop[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    # Rotation (nearest, fill 0), then the flip: the source pixel of every output pixel.
    rows, cols = _rotation_source(size, torch.tensor([p["angle"]]), torch.tensor([p["flip"]]), image.device)
    rows, cols = rows[0], cols[0]
    inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    spatial = torch.where(inside, resized[rows.clamp(0, size - 1), cols.clamp(0, size - 1)], 0.0)
    x = spatial
    if p["sigma"] > 0:
        r = math.ceil(3 * p["sigma"])
        taps = _gaussian_kernels(torch.tensor([p["sigma"]]))[0, BLUR_RADIUS - r:BLUR_RADIUS + r + 1]
        x = F.pad(x[None, None], (r, r, r, r), mode="replicate")
        x = F.conv2d(F.conv2d(x, taps.view(1, 1, -1, 1)), taps.view(1, 1, 1, -1))[0, 0]
    x = _jitter(x[None], torch.tensor([p["brightness"]]), torch.tensor([p["contrast"]]),
                torch.tensor([p["contrast_first"]]))
    out = normalize(x)[0]
    if len(p["holes"]):
        out = out * _cutout_mask(torch.from_numpy(np.asarray(p["holes"]))[None], size)
    return spatial, out


# -------------------------------------------------------------------------------------------- batched
def _resize_crops(bank: torch.Tensor, scale: float, image_index: torch.Tensor, box: torch.Tensor,
                  size: int) -> torch.Tensor:
    """(V, size, size): each view's box cut from its image and resized bilinearly (F.interpolate)."""
    out = torch.empty((len(box), size, size), device=bank.device)
    for k, (i, (top, left, h, w)) in enumerate(zip(image_index.tolist(), box.tolist(), strict=True)):
        crop = bank[i, top:top + h, left:left + w].float().mul_(scale)
        out[k] = F.interpolate(crop[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return out


def _gather_bilinear(bank: torch.Tensor, scale: float, image_index: torch.Tensor, box: torch.Tensor,
                     rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
    """The resized crops' pixels (rows, cols) (V, size, size) read straight from the bank: the bilinear resize of
    F.interpolate (align_corners=False) as four reads per pixel, no per-view work (the GPU path)."""
    height, width = bank.shape[1:]
    y0, y1, wy = _source_index(rows, box[:, 2].view(-1, 1, 1), size)
    x0, x1, wx = _source_index(cols, box[:, 3].view(-1, 1, 1), size)
    base = (image_index.view(-1, 1, 1) * height + box[:, 0].view(-1, 1, 1)) * width + box[:, 1].view(-1, 1, 1)
    flat = bank.reshape(-1)

    def at(y, x):
        return flat[base + y * width + x].float()

    return ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x1))
            + wy * ((1 - wx) * at(y1, x0) + wx * at(y1, x1))) * scale


def batched_views(bank: torch.Tensor, scale: float, image_index: torch.Tensor, params: dict[str, torch.Tensor],
                  size: int, gather: bool | None = None, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every view at once: ``bank`` (N, H, W) uint8 or float16 images (value * ``scale`` in [0, 1], padded; the
    boxes lie inside each image's own size) on any device, ``image_index`` (V,) the image of each view and
    ``params`` the stacked view parameters (:func:`stack_params`). Returns (spatial (V, size, size), input
    (V, 3, size, size)).

    ``gather``: read the resized crops' pixels straight from the bank (default on a GPU) instead of resizing each
    crop with F.interpolate (default on a CPU); the numbers agree to float rounding. ``chunk``: views processed
    together (default: all on a GPU; on a CPU as many as keep a chunk's arrays in the core's cache)."""
    device = bank.device
    p = {k: v.to(device) for k, v in params.items()}
    image_index = image_index.to(device)
    gather = device.type != "cpu" if gather is None else gather
    chunk = chunk or (len(image_index) if device.type != "cpu" else max(1, 2**19 // (size * size)))
    spatial = torch.empty((len(image_index), size, size), device=device)
    out = torch.empty((len(image_index), 3, size, size), device=device)
    for start in range(0, len(image_index), chunk):
        part = slice(start, start + chunk)
        spatial[part], out[part] = _views(bank, scale, image_index[part], {k: v[part] for k, v in p.items()}, size,
                                          gather)
    return spatial, out


def _views(bank, scale, image_index, p, size, gather) -> tuple[torch.Tensor, torch.Tensor]:
    if not gather:
        # Each crop resized by F.interpolate, then one gather from the small resized views: on a CPU the four
        # scattered reads per pixel from the whole bank cost more than a loop over the views.
        return views_from_resized(_resize_crops(bank, scale, image_index, p["box"], size), p)
    rows, cols, inside = _rotation_lookup(size, p, bank.device)
    spatial = torch.where(inside, _gather_bilinear(bank, scale, image_index, p["box"], rows, cols, size), 0.0)
    return spatial, _appearance(spatial, p)


def _rotation_lookup(size: int, p: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols) of the resized crop shown at each output pixel (clamped) and whether it lies inside."""
    rows, cols = _rotation_source(size, p["angle"], p["flip"], device)
    inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    return rows.clamp(0, size - 1), cols.clamp(0, size - 1), inside


def views_from_resized(resized: torch.Tensor, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The views from their crops already resized (V, S, S) in [0, 1] (the DALI loader resizes them): rotation and
    flip (one gather), then the appearance chain. ``p``: stacked parameters on ``resized``'s device."""
    v, size = len(resized), resized.shape[-1]
    rows, cols, inside = _rotation_lookup(size, p, resized.device)
    shown = resized.reshape(v, -1).gather(1, (rows * size + cols).view(v, -1)).view_as(rows)
    spatial = torch.where(inside, shown, 0.0)
    return spatial, _appearance(spatial, p)


def _appearance(spatial: torch.Tensor, p: dict) -> torch.Tensor:
    """Blur (one grouped convolution), jitter, normalisation, cutout: (V, S, S) -> (V, 3, S, S)."""
    taps = _gaussian_kernels(p["sigma"])
    v = len(taps)
    x = F.pad(spatial.unsqueeze(0), (BLUR_RADIUS,) * 4, mode="replicate")
    x = F.conv2d(x, taps.view(v, 1, -1, 1), groups=v)
    x = F.conv2d(x, taps.view(v, 1, 1, -1), groups=v)[0]
    x = _jitter(x, p["brightness"], p["contrast"], p["contrast_first"])
    out = normalize(x)
    if p["holes"].shape[1]:
        out = out * _cutout_mask(p["holes"], spatial.shape[-1]).unsqueeze(1)
    return out
