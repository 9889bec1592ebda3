"""Drop-in networks built on the PCRLv2 3D encoder: the encoder alone, a skip U-Net and a classifier.

The encoder is the four down blocks of :class:`~pcrlv2_fast.models.NonSkipUNet3D` with the official parameter
names (``down_tr64.ops.0.conv1.weight``, ...), so its weights come straight out of an official ``PCRLv23d``
checkpoint, one of ours, a fine-tuning checkpoint (keys under ``encoder.``) or a file written by
:func:`export_encoder`. Loading adapts two things on purpose, and nothing else:

- **Input channels** (e.g. 4 MR modalities into a CT-pretrained encoder). The first convolution's weight
  ``W`` (out, C_ckpt, 3, 3, 3) becomes ``W'[:, j] = sum_c W[:, c] / C_in`` for every new input channel ``j``:
  the pretrained filter is shared by all channels and scaled by ``1 / C_in``, so an input whose channels are
  all equal to one image ``x`` gives exactly the pretrained response to ``x`` (for ``C_ckpt = 1`` this is
  "repeat and divide by C_in"). The bias is kept.
- **Normalisation** (pretrained with BatchNorm, fine-tuned with GroupNorm or InstanceNorm, or back). The
  per-channel affine ``weight``/``bias`` carry over unchanged; BatchNorm running statistics are dropped for
  gn/in, and start fresh (mean 0, var 1) when a bn model loads a checkpoint that has none.

Any other difference (width, missing or mis-shaped keys) raises :class:`~pcrlv2_fast.checkpoint.CheckpointError`
naming the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, check_state_dict, extract_state_dict, load_pretrained_2d, read_checkpoint
from .models.unet3d import DownTransition
from .nn.blocks import NORMS, double_conv
from .utils.io import atomic_torch_save
from .utils.safetensors import write_safetensors

__all__ = [
    "ENCODER_STAGES",
    "PCRLv2Encoder3D",
    "UNet3D",
    "Classifier3D",
    "LinearProbeSeg3D",
    "adapt_first_conv",
    "count_parameters",
    "encoder_arch",
    "encoder_part",
    "encoder_state_dict",
    "export_encoder",
    "layerwise_param_groups",
    "pad_to_divisor",
]

#: The encoder's blocks, shallow to deep (official names).
ENCODER_STAGES = ("down_tr64", "down_tr128", "down_tr256", "down_tr512")
FIRST_CONV = "down_tr64.ops.0.conv1.weight"
# The spatial size every forward pass pads to: three 2x max-pools.
DIVISOR = 8
# Buffers only BatchNorm has.
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """The first convolution's weight (out, C_ckpt, k, k, k) for ``in_channels`` inputs (module docstring rule)."""
    if weight.dim() != 5:
        raise ValueError(f"expected a Conv3d weight (out, in, k, k, k), got shape {tuple(weight.shape)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if weight.shape[1] == in_channels:
        return weight.clone()
    shared = weight.sum(dim=1, keepdim=True) / in_channels
    return shared.expand(-1, in_channels, -1, -1, -1).contiguous()


def _find_encoder_prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    """The prefix under which the encoder's blocks sit ('' for ours/official, 'encoder.' for fine-tuned models)."""
    if FIRST_CONV in state:
        return ""
    candidates = sorted((k[: -len(FIRST_CONV)] for k in state if k.endswith("." + FIRST_CONV)), key=len)
    return candidates[0] if candidates else None


def encoder_state_dict(path: str | Path, map_location="cpu", trusted: bool = False) -> dict[str, torch.Tensor]:
    """The encoder weights of any PCRLv2 3D checkpoint, keyed by the official names (``down_tr64.ops...``).

    Reads official checkpoints (``{'state_dict': ...}``, with or without ``module.``), ours, fine-tuning
    checkpoints (``encoder.down_tr64...``), exported encoders (.pt or .safetensors) and bare state_dicts, without
    running code from the file unless ``trusted`` (see :func:`~pcrlv2_fast.checkpoint.read_checkpoint`). Raises
    CheckpointError when the file has no encoder.
    """
    state = extract_state_dict(read_checkpoint(path, map_location=map_location, trusted=trusted), path)
    return encoder_part(state, path)


def encoder_part(state: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder entries of a model's state_dict (under any prefix), keyed by the official names; ``path`` names
    the source in errors."""
    prefix = _find_encoder_prefix(state)
    if prefix is None:
        raise CheckpointError(
            f"{path}: no PCRLv2 encoder in this checkpoint (no key {FIRST_CONV!r} or '*.{FIRST_CONV}'; "
            f"first keys: {list(state)[:4]}); pass a PCRLv2 3D pretraining or fine-tuning checkpoint"
        )
    first = state[prefix + FIRST_CONV]
    if first.dim() != 5 or min(first.shape[:2]) < 1:
        raise CheckpointError(f"{path}: {prefix + FIRST_CONV} has shape {tuple(first.shape)}, not a 3D convolution "
                              "kernel (out, in, k, k, k); the file is damaged")
    wanted = tuple(prefix + stage + "." for stage in ENCODER_STAGES)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(wanted)}


def encoder_arch(state: Mapping[str, torch.Tensor]) -> dict:
    """Width, input channels, norm ("bn", or "gn" for gn/in) and activation of an encoder state_dict."""
    first = state[FIRST_CONV]
    norm = "bn" if "down_tr64.ops.0.bn1.running_mean" in state else "gn"
    act = "prelu" if "down_tr64.ops.0.activation.weight" in state else "relu"
    return {"width": int(first.shape[0]), "in_channels": int(first.shape[1]), "norm": norm, "act": act}


def _convert_state(state: Mapping[str, torch.Tensor], target: nn.Module, in_channels: int) -> dict[str, torch.Tensor]:
    """Adapt a checkpoint's encoder state to ``target`` (input channels and norm type; module docstring)."""
    own = target.state_dict()
    out = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in _BN_BUFFERS and key not in own:
            continue  # BatchNorm statistics into a gn/in model: dropped
        out[key] = value
    for key, value in own.items():
        if key.rsplit(".", 1)[-1] in _BN_BUFFERS and key not in out:
            out[key] = value.clone()  # a bn model from a gn/in checkpoint: fresh statistics
    if FIRST_CONV in out and out[FIRST_CONV].dim() == 5 and out[FIRST_CONV].shape[1] != in_channels:
        out[FIRST_CONV] = adapt_first_conv(out[FIRST_CONV], in_channels)
    return out


class PCRLv2Encoder3D(nn.Module):
    """The PCRLv2 3D encoder: ``down_tr64``, pool, ``down_tr128``, pool, ``down_tr256``, pool, ``down_tr512``.

    ``forward(x)`` returns the feature pyramid ``[f64, f128, f256, f512]`` at full, 1/2, 1/4 and 1/8 resolution
    with ``out_channels = (2w, 4w, 8w, 16w)`` channels (``w = width``; 32 is the official network). Every spatial
    size must be divisible by 8 (:class:`UNet3D` and :class:`Classifier3D` pad for you).

    ``freeze(n)`` freezes the first ``n`` stages (0..4): their parameters stop requiring gradients and their
    BatchNorm layers stay in eval mode (pretrained statistics) even under ``model.train()``.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, norm: str = "bn", act: str = "relu"):
        super().__init__()
        if width < 1 or in_channels < 1:
            raise ValueError(f"width and in_channels must be >= 1, got width={width}, in_channels={in_channels}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        w = width
        self.in_channels, self.width, self.norm, self.act = in_channels, w, norm, act
        self.out_channels = (2 * w, 4 * w, 8 * w, 16 * w)
        self.maxpool = nn.MaxPool3d(2)
        self.down_tr64 = DownTransition(in_channels, w, 2 * w, act, norm)
        self.down_tr128 = DownTransition(2 * w, 2 * w, 4 * w, act, norm)
        self.down_tr256 = DownTransition(4 * w, 4 * w, 8 * w, act, norm)
        self.down_tr512 = DownTransition(8 * w, 8 * w, 16 * w, act, norm)
        self.frozen_stages = 0

    @property
    def stages(self) -> list[nn.Module]:
        return [getattr(self, name) for name in ENCODER_STAGES]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        if any(s % DIVISOR for s in x.shape[2:]):
            raise ValueError(f"every spatial size must be divisible by {DIVISOR}, got {tuple(x.shape[2:])}")
        features = [self.down_tr64(x)]
        for stage in self.stages[1:]:
            features.append(stage(self.maxpool(features[-1])))
        return features

    def freeze(self, stages: int = len(ENCODER_STAGES)) -> PCRLv2Encoder3D:
        """Freeze the first ``stages`` blocks (4: the whole encoder; 0: unfreeze all)."""
        if not 0 <= stages <= len(ENCODER_STAGES):
            raise ValueError(f"stages to freeze must be in 0..{len(ENCODER_STAGES)}, got {stages}")
        self.frozen_stages = stages
        for i, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(i >= stages)
        return self.train(self.training)

    def train(self, mode: bool = True) -> PCRLv2Encoder3D:
        super().train(mode)
        for stage in self.stages[: self.frozen_stages]:
            stage.eval()  # frozen BatchNorm keeps its (pretrained) running statistics
        return self

    def load_encoder(self, path: str | Path, map_location="cpu", trusted: bool = False) -> PCRLv2Encoder3D:
        """Load the encoder weights of any PCRLv2 3D checkpoint strictly (input channels and norm adapted)."""
        return self._load_state(encoder_state_dict(path, map_location=map_location, trusted=trusted), path)

    def _load_state(self, state: dict[str, torch.Tensor], path: str | Path) -> PCRLv2Encoder3D:
        state = _convert_state(state, self, self.in_channels)
        check_state_dict(self, state, path)
        self.load_state_dict(state, strict=True)
        return self

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        in_channels: int | None = None,
        norm: str | None = None,
        act: str | None = None,
        map_location="cpu",
        trusted: bool = False,
    ) -> PCRLv2Encoder3D:
        """An encoder shaped like the checkpoint's (width; input channels, norm, act unless given) with its weights.

        The checkpoint's norm is read as "bn" when it has BatchNorm statistics and "gn" otherwise (gn and in
        checkpoints hold the same keys); ``act`` must be given for elu checkpoints (elu has no parameters).
        """
        state = encoder_state_dict(path, map_location=map_location, trusted=trusted)
        return cls.from_state_dict(state, path, in_channels=in_channels, norm=norm, act=act)

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, torch.Tensor],
        source: str | Path = "state_dict",
        in_channels: int | None = None,
        norm: str | None = None,
        act: str | None = None,
    ) -> PCRLv2Encoder3D:
        """:meth:`from_checkpoint` for a state_dict in memory (e.g. a pretraining model's, any key prefix);
        ``source`` names it in errors."""
        state = encoder_part(state, source)
        arch = encoder_arch(state)
        kwargs = dict(in_channels=in_channels or arch["in_channels"], width=arch["width"], norm=norm or arch["norm"],
                      act=act or arch["act"])
        with torch.device("meta"):  # shapes checked before any memory is taken: a file may claim any width
            probe = cls(**kwargs)
        check_state_dict(probe, _convert_state(state, probe, kwargs["in_channels"]), source)
        return cls(**kwargs)._load_state(state, source)


EXPORT_FORMATS = ("pt", "safetensors")


def export_format(out: str | Path, format: str | None = None) -> str:
    """The export format: ``format`` when given, else from ``out``'s suffix (``.safetensors``, otherwise pt)."""
    if format is None:
        return "safetensors" if str(out).lower().endswith(".safetensors") else "pt"
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    return format


def export_encoder(checkpoint: str | Path, out: str | Path, format: str | None = None, trusted: bool = False) -> Path:
    """Write the encoder of ``checkpoint`` (official key names, tensors only) atomically, as a PyTorch state_dict
    (``format="pt"``) or a safetensors file (``"safetensors"``, which cannot carry code: the format for sharing;
    its metadata records the encoder's width, input channels, norm and activation). Default: from ``out``'s suffix.

    Either file loads wherever a checkpoint is accepted; the .pt with ``torch.load(out, weights_only=True)``, the
    .safetensors with ``safetensors.torch.load_file``, into ``PCRLv2Encoder3D(width=...)``, into ``NonSkipUNet3D``
    with ``strict=False``, or into any network that reuses the official block names. A 2D checkpoint gives its
    ResNet-18 encoder under torchvision's names (120 tensors): ``ResNet18Encoder``, ``load_pretrained_2d``, or
    torchvision's ``resnet18`` with ``strict=False`` (no ``fc``).
    """
    fmt = export_format(out, format)
    raw = extract_state_dict(read_checkpoint(checkpoint, trusted=trusted), checkpoint)
    two_d = is_2d_state(raw)
    # 2D: the ResNet-18 encoder under torchvision's names (loads into torchvision's resnet18 with strict=False).
    source = load_pretrained_2d(checkpoint, trusted=trusted).encoder.state_dict() if two_d else encoder_part(
        raw, checkpoint)
    state = {k: v.detach().clone().contiguous() for k, v in source.items()}
    out = Path(out)
    if out.resolve() == Path(checkpoint).resolve():
        raise ValueError(f"{out}: the export would overwrite its own source checkpoint; choose another --out")
    if fmt == "safetensors":
        arch = {"dims": "2", "network": "resnet18"} if two_d else {k: str(v) for k, v in encoder_arch(state).items()}
        write_safetensors(out, state, {"format": "pcrlv2_fast-encoder", "source": Path(checkpoint).name, **arch})
    else:
        atomic_torch_save(state, out)
    return out


def is_2d_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state_dict holds the 2D network's ResNet-18 encoder (any prefix)."""
    return any(k.endswith("layer4.1.bn2.weight") for k in state)


def pad_to_divisor(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pad (at the far end of each axis, replicating the border) so every spatial size is divisible by 8."""
    sizes = tuple(int(s) for s in x.shape[2:])
    extra = [(-s) % DIVISOR for s in sizes]
    if not any(extra):
        return x, sizes
    # F.pad lists the last axis first; replicate padding keeps background intensities at the border.
    pad = (0, extra[2], 0, extra[1], 0, extra[0])
    return F.pad(x, pad, mode="replicate"), sizes


class _UpBlock(nn.Module):
    """Transposed conv x2, concatenation with the encoder feature of that scale, two LUConvs."""

    def __init__(self, in_chan: int, skip_chan: int, out_chan: int, act: str, norm: str):
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_chan, in_chan, kernel_size=2, stride=2)
        self.ops = double_conv(in_chan + skip_chan, out_chan, out_chan, act, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat([self.up_conv(x), skip], dim=1))


class UNet3D(nn.Module):
    """A 3D U-Net with skip connections whose encoder is :class:`PCRLv2Encoder3D` (decoder freshly initialised).

    The decoder mirrors the pretraining network's (``up_tr256``, ``up_tr128``, ``up_tr64``, ``out_tr``) but
    concatenates each encoder feature before its two convolutions, as the Models Genesis / PCRLv2 fine-tuning
    U-Net does. ``forward(x)`` returns logits (B, num_classes, X, Y, Z) for any spatial size >= 1: the input is
    padded to a multiple of 8 (replicating the border) and the output cropped back.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        width: int = 32,
        norm: str = "bn",
        act: str = "relu",
        encoder: PCRLv2Encoder3D | None = None,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if encoder is None:
            encoder = PCRLv2Encoder3D(in_channels=in_channels, width=width, norm=norm, act=act)
        self.encoder = encoder
        enc = self.encoder
        c64, c128, c256, c512 = enc.out_channels
        self.num_classes = num_classes
        self.up_tr256 = _UpBlock(c512, c256, c256, enc.act, enc.norm)
        self.up_tr128 = _UpBlock(c256, c128, c128, enc.act, enc.norm)
        self.up_tr64 = _UpBlock(c128, c64, c64, enc.act, enc.norm)
        self.out_tr = nn.Module()
        self.out_tr.final_conv = nn.Conv3d(c64, num_classes, kernel_size=1)

    @classmethod
    def from_pretrained(cls, path: str | Path, num_classes: int, in_channels: int | None = None,
                        norm: str | None = None, act: str | None = None) -> UNet3D:
        """A U-Net whose encoder is loaded from a PCRLv2 checkpoint (see :meth:`PCRLv2Encoder3D.from_checkpoint`)."""
        return cls(num_classes, encoder=PCRLv2Encoder3D.from_checkpoint(path, in_channels, norm, act))

    def decoder_parameters(self) -> Iterable[nn.Parameter]:
        for name, p in self.named_parameters():
            if not name.startswith("encoder."):
                yield p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, sizes = pad_to_divisor(x)
        f64, f128, f256, f512 = self.encoder(x)
        out = self.up_tr256(f512, f256)
        out = self.up_tr128(out, f128)
        out = self.up_tr64(out, f64)
        logits = self.out_tr.final_conv(out)
        return logits[:, :, : sizes[0], : sizes[1], : sizes[2]]


class LinearProbeSeg3D(nn.Module):
    """Linear segmentation probe on a frozen encoder: one 1x1x1 convolution over the hypercolumn of all four
    stages (each feature upsampled trilinearly to full resolution).

    A 1x1x1 convolution commutes with trilinear upsampling, so each stage is projected to ``num_classes``
    channels at its own resolution and the upsampled projections are summed: the same linear classifier, without
    building the 30w-channel full-resolution hypercolumn.
    """

    def __init__(self, num_classes: int, encoder: PCRLv2Encoder3D):
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes
        self.heads = nn.ModuleList(nn.Conv3d(c, num_classes, kernel_size=1, bias=i == 0)
                                   for i, c in enumerate(encoder.out_channels))
        encoder.freeze(len(ENCODER_STAGES))

    def decoder_parameters(self) -> Iterable[nn.Parameter]:
        return self.heads.parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, sizes = pad_to_divisor(x)
        with torch.no_grad():
            features = self.encoder(x)
        full = features[0].shape[2:]
        logits = self.heads[0](features[0])
        for head, feature in zip(self.heads[1:], features[1:]):
            logits = logits + F.interpolate(head(feature), size=full, mode="trilinear", align_corners=False)
        return logits[:, :, : sizes[0], : sizes[1], : sizes[2]]


class Classifier3D(nn.Module):
    """:class:`PCRLv2Encoder3D` -> global pooling of the deepest feature -> dropout -> linear head.

    ``pool``: "avg", "max" or "avgmax" (both, concatenated). ``hidden > 0`` puts a hidden layer of that size (ReLU)
    before the output layer. ``forward(x)`` returns logits (B, num_classes) for
    any spatial size (padded to a multiple of 8 like :class:`UNet3D`).
    """

    POOLS = ("avg", "max", "avgmax")

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        width: int = 32,
        norm: str = "bn",
        act: str = "relu",
        encoder: PCRLv2Encoder3D | None = None,
        pool: str = "avg",
        dropout: float = 0.0,
        hidden: int = 0,
    ):
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, got {pool!r}")
        if num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {num_classes}")
        if encoder is None:
            encoder = PCRLv2Encoder3D(in_channels=in_channels, width=width, norm=norm, act=act)
        self.encoder = encoder
        self.num_classes, self.pool = num_classes, pool
        features = self.encoder.out_channels[-1] * (2 if pool == "avgmax" else 1)
        self.dropout = nn.Dropout(dropout)
        if hidden > 0:
            self.head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, num_classes))
        else:
            self.head = nn.Linear(features, num_classes)

    @classmethod
    def from_pretrained(cls, path: str | Path, num_classes: int, in_channels: int | None = None,
                        norm: str | None = None, act: str | None = None, **kwargs) -> Classifier3D:
        """A classifier whose encoder is loaded from a PCRLv2 checkpoint; ``kwargs``: pool, dropout, hidden."""
        return cls(num_classes, encoder=PCRLv2Encoder3D.from_checkpoint(path, in_channels, norm, act), **kwargs)

    def decoder_parameters(self) -> Iterable[nn.Parameter]:
        return self.head.parameters()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = pad_to_divisor(x)
        deepest = self.encoder(x)[-1]
        pooled = []
        if self.pool in ("avg", "avgmax"):
            pooled.append(deepest.mean(dim=(2, 3, 4)))
        if self.pool in ("max", "avgmax"):
            pooled.append(deepest.amax(dim=(2, 3, 4)))
        return torch.cat(pooled, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def layerwise_param_groups(
    model: nn.Module, lr: float, layer_decay: float = 1.0, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer parameter groups with learning rates decaying by depth into the encoder.

    Everything outside ``model.encoder`` (decoder, heads) gets ``lr``; encoder stage ``down_tr512`` gets
    ``lr * layer_decay``, ``down_tr256`` ``lr * layer_decay**2``, down to ``down_tr64`` with ``layer_decay**4``
    (``layer_decay = 1`` gives one learning rate). Weight decay applies to weights of convolutions and linear
    layers only, not to biases and norm parameters. Parameters that do not require gradients are left out.
    Each group carries ``name`` and ``lr_scale`` (its share of the base rate, for schedulers).
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depth_of = {stage: len(ENCODER_STAGES) - i for i, stage in enumerate(ENCODER_STAGES)}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        depth, group = 0, "head"
        if parts[0] == "encoder" and len(parts) > 1 and parts[1] in depth_of:
            group, depth = parts[1], depth_of[parts[1]]
        decay = p.dim() > 1
        key = (group, decay)
        if key not in groups:
            scale = layer_decay**depth
            groups[key] = {"name": f"{group}{'' if decay else '.no_decay'}", "params": [], "lr": lr * scale,
                           "lr_scale": scale, "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
    return sorted(groups.values(), key=lambda g: (-g["lr_scale"], g["name"]))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
