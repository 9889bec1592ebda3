"""The official 2D view chain (RL4M/PCRLv2 ``train_2d.py``: torchvision transforms on PIL images), rewritten with PIL
and numpy only (torchvision is not a dependency), for the 2D data benchmark and the faithfulness test.

Per item, as the official ``ChestDataset.__getitem__``: the file is opened and converted to RGB; each view is
RandomResizedCrop (PIL bilinear resize of the box) -> rotation (nearest, fill 0, about the centre) -> horizontal
flip -> grayscale -> Gaussian blur (PIL's GaussianBlur(radius=sigma)) -> ColorJitter (brightness, contrast,
saturation, hue in the drawn order, each on 8-bit PIL images) -> ToTensor -> ImageNet Normalize -> cutout (global
views). The parameters are the engine's draws (``views2d.draw_view``) so that both chains can be compared on the
same views.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from pcrlv2_fast.data.views2d import IMAGENET_MEAN, IMAGENET_STD, ViewConfig2D, draw_views

MEAN = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
STD = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def _hue(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's adjust_hue on a PIL image: shift the 8-bit H channel."""
    h, s, v = img.convert("HSV").split()
    shifted = (np.asarray(h, dtype=np.uint8).astype(np.int16) + int(round(factor * 255))) % 256
    return Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v)).convert("RGB")


def _jitter(img: Image.Image, p: dict) -> Image.Image:
    for op in p["order"]:
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(p["brightness"])
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(p["contrast"])
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(p["saturation"])
        else:
            img = _hue(img, p["hue"])
    return img


def spatial_view(img: Image.Image, p: dict, size: int) -> Image.Image:
    top, left, h, w = (int(v) for v in p["box"])
    view = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    view = view.rotate(p["angle"], resample=Image.NEAREST, fillcolor=(0, 0, 0))
    return view.transpose(Image.FLIP_LEFT_RIGHT) if p["flip"] else view


def to_normalized(img: Image.Image) -> np.ndarray:
    return (np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0 - MEAN) / STD


def official_view(img: Image.Image, p: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(normalised spatial view (3, size, size), network input (3, size, size)) of an RGB PIL image."""
    view = spatial_view(img, p, size)
    target = to_normalized(view)
    if p["gray"]:
        view = view.convert("L").convert("RGB")
    if p["sigma"] > 0:
        view = view.filter(ImageFilter.GaussianBlur(radius=p["sigma"]))
    x = to_normalized(_jitter(view, p))
    for y0, y1, x0, x1 in p["holes"]:
        x[:, y0:y1, x0:x1] = 0.0
    return target, x


def official_item(path_or_image, rng: np.random.Generator, cfg: ViewConfig2D | None = None) -> dict:
    """One official sample: the file opened and converted to RGB (or an image given), then every view."""
    cfg = cfg or ViewConfig2D()
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image).convert("RGB")
    g, loc = draw_views(rng, img.height, img.width, cfg)
    (gt, x1), (_, x2) = (official_view(img, p, cfg.global_size) for p in g)
    locals_ = [official_view(img, p, cfg.local_size)[1] for p in loc]
    return {"x1": torch.from_numpy(x1), "x2": torch.from_numpy(x2), "gt": torch.from_numpy(gt),
            "locals": torch.from_numpy(np.stack(locals_))}
