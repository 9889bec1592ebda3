"""Checkpoints in the official format (``{'state_dict', 'optimizer', 'epoch'}``) plus our own fields.

``load_pretrained`` reads official PCRLv2 3D checkpoints (saved from ``model.module`` or, with a
``module.`` prefix, from the DataParallel wrapper) and ours, with strict key and shape checking.

Loading never runs code from the file (:func:`read_checkpoint`): PyTorch files are unpickled with
``weights_only=True``, which builds tensors, containers and numbers only, plus an allow-list of the types that
real PCRLv2 checkpoints hold (the official scripts' ``argparse.Namespace`` under ``opt``; numpy scalars, arrays
and dtypes). A file that names any other global is refused with :class:`UntrustedCheckpointError`, naming the
file and the global, before anything in it runs; ``trusted=True`` (CLI: ``--trust-checkpoint``) unpickles it
fully after a warning. ``.safetensors`` files load wherever a checkpoint is accepted. This project's own
checkpoints hold tensors, dicts, lists, strings and numbers only, so they need nothing beyond ``weights_only``.

A training run keeps its last checkpoints as ``checkpoint-<step>.pt`` next to ``checkpoint.pt`` (the newest,
a hard link to the newest numbered file): :func:`save_rotating_checkpoint` writes them and
:func:`find_latest_checkpoint` picks the newest readable one when a run resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from .models import NonSkipUNet2D, NonSkipUNet3D
from .utils.io import _fsync_dir, atomic_torch_save, atomic_write
from .utils.safetensors import SafetensorsError, is_safetensors, read_safetensors

STATE_KEYS = ("state_dict", "model", "model_state_dict")
LATEST = "checkpoint.pt"
NUMBERED = re.compile(r"^checkpoint-(\d+)\.pt$")
# What a resumable training checkpoint must hold besides the official fields.
TRAINING_KEYS = ("state_dict", "optimizer", "step")
PREFIXES = ("module.", "_orig_mod.", "model.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the fix."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint whose pickle names a type outside the allow-list; loading it could run code."""


class UntrustedCheckpointWarning(UserWarning):
    """A checkpoint is being loaded with full unpickling because the caller trusts it."""


def _allowed_globals() -> list:
    """The non-tensor types a checkpoint may hold: those the official training scripts put there (``opt`` is an
    ``argparse.Namespace``; numpy scalars and arrays in logged values), under numpy 1's and numpy 2's names."""
    core = getattr(np, "_core", None) or np.core
    allowed: list = [argparse.Namespace, np.ndarray, np.dtype, core.multiarray.scalar, core.multiarray._reconstruct]
    # A file written under numpy 1 names numpy.core.multiarray.*; numpy 2 calls the module numpy._core.
    for name in ("scalar", "_reconstruct"):
        allowed.append((getattr(core.multiarray, name), f"numpy.core.multiarray.{name}"))
    # Unpickling a dtype restores its state on its class (numpy.dtypes.Float64DType, ...): the numeric ones.
    allowed += list({type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"} - {np.dtype})
    return allowed


def _global_name(g) -> str:
    return g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__name__}"


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The refused globals a file names, read from its pickle without running it (else from torch's message)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    found: list[str] = []
    if finder is not None:
        with contextlib.suppress(Exception):  # legacy (non-zip) files are not supported by the finder
            found = list(finder(path))
    found = found or re.findall(r"GLOBAL ([\w.]+)", str(error))
    found += re.findall(r"got <class '([\w.]+)'>", str(error))
    allowed = {_global_name(g) for g in _allowed_globals()}
    return sorted(set(found) - allowed)


def _importable_name(name: str) -> bool:
    """Whether a global looks like ``module.attribute`` at all (a bit flip in a pickle makes names like 'tor|')."""
    parts = name.split(".")
    return len(parts) >= 2 and all(part.isidentifier() for part in parts)


def _refusal(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    """Refuse a file that names a type outside the allow-list; a damaged one (a truncated legacy file, whose cut-off
    global names a torch function that does not exist, or flipped bytes in a name) is reported as unreadable."""
    names = _unsafe_globals(path, error)
    if not names or all(n.startswith("torch.") or not _importable_name(n) for n in names):
        return _unreadable(path, error)
    return UntrustedCheckpointError(
        f"{path}: refused: unpickling it would call {', '.join(names[:8])}, which is not among the types a weights "
        "checkpoint needs and could run any code; nothing from the file was run. If you trust its source, load it "
        "with --trust-checkpoint (Python: trusted=True); better, ask for the weights as .safetensors"
    )


def _weights_only_load(path: Path, map_location) -> object:
    allowed = _allowed_globals()
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is None:  # torch 2.4: only the process-wide registry, and only plain callables
        torch.serialization.add_safe_globals([g for g in allowed if not isinstance(g, tuple)])
        return torch.load(path, map_location=map_location, weights_only=True)
    with scoped(allowed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a plain pickle; refused below
        return torch.load(path, map_location=map_location, weights_only=True)


def read_checkpoint(path: str | Path, map_location="cpu", trusted: bool = False) -> dict:
    """The dict stored in a checkpoint file, read without running code from it.

    PyTorch files load with ``weights_only=True`` and only the allow-listed types above; a file that needs any
    other global raises :class:`UntrustedCheckpointError` naming it, before anything in it runs. ``trusted=True``
    (the CLI's ``--trust-checkpoint``) loads such a file with full unpickling, after a warning. ``.safetensors``
    files (recognised by content) load as ``{"state_dict": tensors, "metadata": {...}}``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if is_safetensors(path):
        try:
            tensors, metadata = read_safetensors(path)
        except SafetensorsError as error:
            raise CheckpointError(f"{error}; re-download or re-export it") from error
        return {"state_dict": tensors, "metadata": metadata}
    if trusted:
        warnings.warn(f"{path}: loading with full unpickling (trusted): code in this file runs with your rights",
                      UntrustedCheckpointWarning, stacklevel=2)
    try:
        if trusted:
            obj = torch.load(path, map_location=map_location, weights_only=False)
        else:
            obj = _weights_only_load(path, map_location)
    except pickle.UnpicklingError as error:
        raise _refusal(path, error) from None
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise _unreadable(path, error) from error
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return dict(obj)


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    text = str(error)
    if "WeightsUnpickler error:" in text:  # keep torch's reason, not its advice to turn off weights_only
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())[:300]
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {text}); the file "
                           "may be truncated or from another program: re-download or re-save it")


def extract_state_dict(ckpt: Mapping, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint dict, with DataParallel/compile/wrapper prefixes removed."""
    state = next((ckpt[k] for k in STATE_KEYS if k in ckpt and isinstance(ckpt[k], Mapping)), None)
    if state is None:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            state = ckpt  # a bare state_dict
        else:
            raise CheckpointError(f"{path}: no model weights found (looked for keys {STATE_KEYS} or a bare state_dict)")
    state = dict(state)
    odd = [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if odd:
        raise CheckpointError(f"{path}: the model weights hold entries that are not named tensors: {', '.join(odd[:5])}"
                              f"{' ...' if len(odd) > 5 else ''}; the file is damaged or not a model checkpoint")
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | Path,
                     expected: str = "A PCRLv2 3D checkpoint (official PCRLv23d or pcrlv2_fast) is expected; check the "
                                     "file, or the width/norm/act arguments.") -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped key; ``expected`` says what
    would fit."""
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
        + "\n  " + expected
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
    if first.dim() != 5 or final.dim() != 5 or min(first.shape[:2]) < 1 or final.shape[0] < 1:
        raise CheckpointError(f"{path}: first/last convolution weights of shapes {tuple(first.shape)} and "
                              f"{tuple(final.shape)} are not 3D convolution kernels; the file is damaged")
    kwargs = {"width": int(first.shape[0]), "in_channels": int(first.shape[1]), "n_class": int(final.shape[0])}
    if "down_tr64.ops.0.activation.weight" in state:
        kwargs["act"] = "prelu"
    if "down_tr64.ops.0.bn1.running_mean" not in state:
        kwargs["norm"] = "gn"
    return kwargs


def load_pretrained(path: str | Path, model: NonSkipUNet3D | None = None, map_location="cpu", trusted: bool = False,
                    **model_kwargs):
    """Load a PCRLv2 3D checkpoint strictly into ``model`` (or a new ``NonSkipUNet3D`` built to fit it).

    Accepts official checkpoints (``{'state_dict': ...}``, with or without the ``module.`` prefix of
    DataParallel), ours, and bare state_dicts. Shape or key mismatches raise ``CheckpointError`` listing them.
    ``model_kwargs`` (e.g. ``act="elu"``, ``norm="in"``) override what is inferred from the weights. The file is
    read as :func:`read_checkpoint` reads it (``trusted`` lets it unpickle types outside the allow-list).
    """
    ckpt = read_checkpoint(path, map_location=map_location, trusted=trusted)
    state = extract_state_dict(ckpt, path)
    if model is None:
        kwargs = {**infer_model_kwargs(state, path), **model_kwargs}
        with torch.device("meta"):  # shapes checked before any memory is taken: a file may claim any width
            check_state_dict(NonSkipUNet3D(**kwargs), state, path)
        model = NonSkipUNet3D(**kwargs)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    return model


def load_pretrained_2d(path: str | Path, model: NonSkipUNet2D | None = None, map_location="cpu",
                       trusted: bool = False) -> NonSkipUNet2D:
    """Load a PCRLv2 2D checkpoint strictly into ``model`` (or a new ``NonSkipUNet2D``).

    Accepts a whole 2D model (ours; ``model.encoder.*``, ``model.decoder.*``, ``model.segmentation_head.*``) and an
    encoder alone: the official 2D checkpoints (``{'opt', 'state_dict', 'optimizer', 'epoch'}`` holding the 120
    ResNet-18 encoder keys), a torchvision ResNet-18 state_dict (e.g. ImageNet weights; its ``fc.*`` classifier is
    left out) or a fine-tuned 2D classifier (its ``head.*`` left out). An encoder alone loads into ``model.encoder``
    and leaves the decoder as it is. Mismatches raise
    ``CheckpointError`` listing them."""
    state = extract_state_dict(read_checkpoint(path, map_location=map_location, trusted=trusted), path)
    model = model if model is not None else NonSkipUNet2D()
    whole = any(k.startswith(("decoder.", "model.decoder.")) for k in state)
    if whole:
        state = {k if k.startswith("model.") else f"model.{k}": v for k, v in state.items()}
        check_state_dict(model, state, path, expected="A whole PCRLv2 2D model (NonSkipUNet2D) is expected.")
        model.load_state_dict(state, strict=True)
        return model
    # fc.*: a torchvision classifier; head.*: a fine-tuned Classifier2D (its encoder is what carries over).
    state = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in state.items()
             if not k.startswith(("fc.", "head."))}
    check_state_dict(model.encoder, state, path, expected="A ResNet-18 encoder (official PCRLv2 2D checkpoint or a "
                     "torchvision resnet18 state_dict) or a whole PCRLv2 2D model is expected.")
    model.encoder.load_state_dict(state, strict=True)
    return model


def plain(value):
    """``value`` with only the types ``torch.load(weights_only=True)`` builds without an allow-list: subclasses of
    str/int/float (torch's TorchVersion, numpy scalars) become the base type, paths become strings."""
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):  # a namedtuple becomes a plain tuple
        return [plain(v) for v in value] if isinstance(value, list) else tuple(plain(v) for v in value)
    if isinstance(value, bool | np.bool_):
        return bool(value)
    for base in (str, int, float):
        if isinstance(value, base) and type(value) is not base:
            return base(value)
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer=None, epoch: int = 0, **extra) -> Path:
    """Write an official-format checkpoint atomically (temp file, then rename); extra fields are added as-is."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    state = {
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        **{k: plain(v) for k, v in extra.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, path)
    return path


# ------------------------------------------------------------------------------------ training runs
def numbered_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>.pt`` in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NUMBERED.match(p.name))]
    return sorted(found)


def _point_latest(path: Path, latest: Path) -> None:
    """Make ``latest`` name the file ``path`` in one atomic step: a hard link where the file system has them,
    else a copy."""
    tmp = latest.with_name(f".{latest.name}.{secrets.token_hex(8)}.tmp")
    try:
        os.link(path, tmp)
    except OSError:
        with atomic_write(latest, "wb") as dst, open(path, "rb") as src:
            shutil.copyfileobj(src, dst)
        return
    try:
        os.replace(tmp, latest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(latest.parent)


def save_rotating_checkpoint(folder: str | Path, step: int, model: torch.nn.Module, optimizer=None, epoch: int = 0,
                             keep: int = 2, **extra) -> Path:
    """Save a training checkpoint as ``folder/checkpoint-<step>.pt`` with ``folder/checkpoint.pt`` naming it, and
    keep only the ``keep`` newest numbered files (numbered files of later steps, left by a run that this one
    resumed before, are removed too). ``keep=0`` writes ``checkpoint.pt`` alone. Returns ``checkpoint.pt``."""
    folder = Path(folder)
    latest = folder / LATEST
    if keep < 1:
        return save_checkpoint(latest, model, optimizer, epoch=epoch, step=step, **extra)
    path = save_checkpoint(folder / f"checkpoint-{step}.pt", model, optimizer, epoch=epoch, step=step, **extra)
    _point_latest(path, latest)
    older = [p for s, p in numbered_checkpoints(folder) if s < step]
    stale = [p for s, p in numbered_checkpoints(folder) if s > step]
    for p in older[:max(0, len(older) - (keep - 1))] + stale:
        p.unlink(missing_ok=True)
    return latest


def read_training_checkpoint(path: str | Path, map_location="cpu", trusted: bool = False) -> dict:
    """A checkpoint that a training run can continue from; CheckpointError when it is unreadable or lacks
    the training state."""
    ckpt = read_checkpoint(path, map_location=map_location, trusted=trusted)
    for key in TRAINING_KEYS:
        if key not in ckpt:
            raise CheckpointError(f"{path}: has no {key!r}; only pcrlv2_fast training checkpoints can be resumed "
                                  "(use load_pretrained to start from official weights)")
    return ckpt


def find_latest_checkpoint(folder: str | Path, map_location="cpu",
                           on_skip: Callable[[Path, CheckpointError], None] | None = None, trusted: bool = False
                           ) -> tuple[Path, dict] | None:
    """The newest readable training checkpoint in ``folder`` as ``(path, checkpoint)``, or None when there is none.

    ``checkpoint.pt`` is read first; numbered checkpoints of later steps (a save that stopped before it moved
    ``checkpoint.pt``) and, when it is unreadable, of earlier steps are tried newest first. Each unreadable
    file is passed to ``on_skip`` and passed over.
    """
    folder = Path(folder)
    best: tuple[int, Path, dict] | None = None
    latest = folder / LATEST
    if latest.exists():
        try:
            ckpt = read_training_checkpoint(latest, map_location, trusted)
            best = (int(ckpt["step"]), latest, ckpt)
        except CheckpointError as error:
            if on_skip is not None:
                on_skip(latest, error)
    for step, path in reversed(numbered_checkpoints(folder)):
        if best is not None and step <= best[0]:
            break
        try:
            ckpt = read_training_checkpoint(path, map_location, trusted)
        except CheckpointError as error:
            if on_skip is not None:
                on_skip(path, error)
            continue
        best = (int(ckpt["step"]), path, ckpt)
        break
    return None if best is None else (best[1], best[2])
