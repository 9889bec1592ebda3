"""Checkpoints in the official format (``{'state_dict', 'optimizer', 'epoch'}``) plus our own fields.

``load_pretrained`` reads official PCRLv2 3D checkpoints (saved from ``model.module`` or, with a
``module.`` prefix, from the DataParallel wrapper) and ours, with strict key and shape checking.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .models import NonSkipUNet3D
from .utils.io import atomic_torch_save

STATE_KEYS = ("state_dict", "model", "model_state_dict")
PREFIXES = ("module.", "_orig_mod.", "model.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the fix."""


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); "
            "the file may be truncated or from another program — re-download or re-save it"
        ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return dict(obj)


def extract_state_dict(ckpt: Mapping, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint dict, with DataParallel/compile/wrapper prefixes removed."""
    state = next((ckpt[k] for k in STATE_KEYS if k in ckpt and isinstance(ckpt[k], Mapping)), None)
    if state is None:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            state = ckpt  # a bare state_dict
        else:
            raise CheckpointError(f"{path}: no model weights found (looked for keys {STATE_KEYS} or a bare state_dict)")
    state = dict(state)
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if not (missing or unexpected or misshaped):
        return

    def show(title, items):
        head = items[:12]
        more = f"\n    ... and {len(items) - len(head)} more" if len(items) > len(head) else ""
        return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(head) + more if items else ""

    raise CheckpointError(
        f"{path}: checkpoint does not match {type(model).__name__}(width={getattr(model, 'width', '?')})"
        + show("missing keys", missing)
        + show("unexpected keys", unexpected)
        + show("mis-shaped keys", misshaped)
        + "\n  A PCRLv2 3D checkpoint (official PCRLv23d or pcrlv2_fast) is expected; check the file, or the"
        " width/norm/act arguments."
    )


def infer_model_kwargs(state: Mapping[str, torch.Tensor], path: str | Path) -> dict:
    """Width, input channels, classes and activation of a PCRLv2 3D state_dict."""
    try:
        first = state["down_tr64.ops.0.conv1.weight"]
        final = state["out_tr.final_conv.weight"]
    except KeyError as exc:
        raise CheckpointError(
            f"{path}: not a PCRLv2 3D checkpoint (no {exc.args[0]!r}); "
            f"first keys are {list(state)[:5]}"
        ) from None
    kwargs = {"width": int(first.shape[0]), "in_channels": int(first.shape[1]), "n_class": int(final.shape[0])}
    if "down_tr64.ops.0.activation.weight" in state:
        kwargs["act"] = "prelu"
    if "down_tr64.ops.0.bn1.running_mean" not in state:
        kwargs["norm"] = "gn"
    return kwargs


def load_pretrained(path: str | Path, model: NonSkipUNet3D | None = None, map_location="cpu", **model_kwargs):
    """Load a PCRLv2 3D checkpoint strictly into ``model`` (or a new ``NonSkipUNet3D`` built to fit it).

    Accepts official checkpoints (``{'state_dict': ...}``, with or without the ``module.`` prefix of
    DataParallel), ours, and bare state_dicts. Shape or key mismatches raise ``CheckpointError`` listing them.
    ``model_kwargs`` (e.g. ``act="elu"``, ``norm="in"``) override what is inferred from the weights.
    """
    ckpt = read_checkpoint(path, map_location=map_location)
    state = extract_state_dict(ckpt, path)
    if model is None:
        kwargs = {**infer_model_kwargs(state, path), **model_kwargs}
        model = NonSkipUNet3D(**kwargs)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    return model


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer=None, epoch: int = 0, **extra) -> Path:
    """Write an official-format checkpoint atomically (temp file, then rename); extra fields are added as-is."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    state = {
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, path)
    return path
