"""``fuse_model``: switch an existing network's conv blocks to the fused kernels in place, keeping its state_dict.

Two patterns are fused:
- the model's conv block (``LUConv``: children ``conv1``, ``bn1``, ``activation``) becomes a
  :class:`FusedConvBlock3d` (its class changes; children, parameters, buffers and hooks stay);
- inside a plain ``nn.Sequential``, a run Conv3d -> BatchNorm3d / GroupNorm / InstanceNorm3d -> ReLU / ELU /
  PReLU / Sigmoid, or norm -> activation, is fused while the children stay where they are: the container
  becomes a :class:`FusedSequential`, so its state_dict keys do not change.

Fuse before wrapping the model in ``torch.compile`` (a compiled graph does not see later changes); DDP and
DataParallel wrappers are walked through.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .blocks import LUConv
from .dispatch import check_kernels, kernels_run_on
from .functional import act_kind, conv_gives_stats, norm_kind, unsupported_reason
from .modules import FusedConvBlock3d, FusedSequential, _check_conv_impl

# Norms of 3-D networks (GroupNorm is dimension-agnostic: a fused run falls back to torch on non-5-D inputs).
_NORM_TYPES = (nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm3d, nn.GroupNorm)


@dataclass
class FusedBlock:
    path: str  # the module (conv block) or container (runs) that was converted; "" for the root
    kind: str  # "conv_block", "conv_norm_act" (a run in a Sequential) or "norm_act"
    children: tuple[str, ...]  # the fused children's names
    norm: str  # "bn", "gn" or "in"
    act: str


@dataclass
class FuseReport:
    """What :func:`fuse_model` fused (``fused``) and what it left to torch with the reason (``skipped``)."""

    kernels: str
    fused: list[FusedBlock] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.fused)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.fused:
            out[b.kind] = out.get(b.kind, 0) + 1
        return out

    def table(self) -> str:
        rows = [(b.path or "<root>", b.kind, ",".join(b.children), b.norm, b.act) for b in self.fused]
        head = ("module", "kind", "children", "norm", "act")
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
        lines = [f"fused {len(self.fused)} blocks (kernels={self.kernels!r}): {self.counts()}",
                 "  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines += [f"not fused: {path or '<root>'}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_activation(m: nn.Module) -> bool:
    return type(m).__module__ == nn.modules.activation.__name__


def _runs(seq: nn.Sequential, path: str, report: FuseReport) -> list[tuple[str, ...]]:
    """Fusable runs among the children of ``seq``, in order and non-overlapping; unfusable look-alikes are
    reported as skipped."""
    names = list(seq._modules)
    mods = [seq._modules[n] for n in names]
    runs, i = [], 0
    while i < len(mods):
        start = i + 1 if type(mods[i]) is nn.Conv3d else i
        if start + 1 < len(mods) and isinstance(mods[start], _NORM_TYPES) and _is_activation(mods[start + 1]):
            norm, act = mods[start], mods[start + 1]
            reason = unsupported_reason(norm, act)
            if reason is None:
                run = tuple(names[i:start + 2])
                runs.append(run)
                kind = "conv_norm_act" if len(run) == 3 else "norm_act"
                report.fused.append(FusedBlock(path, kind, run, norm_kind(norm), act_kind(act)))
            else:
                report.skipped.append((_join(path, names[start]), reason))
            i = start + 2
            continue
        i += 1
    return runs


def fuse_model(model: nn.Module, kernels: str = "triton", conv_impl: str = "auto") -> FuseReport:
    """Convert ``model`` in place to run its conv blocks and conv -> norm -> activation runs fused.

    ``kernels="torch"`` converts the same blocks but keeps them on the plain PyTorch path (a switch back);
    ``conv_impl`` is passed to ``conv3d_bn_stats`` as ``impl``. Parameters, buffers, their names and values,
    and therefore ``state_dict()``, are unchanged. Returns a :class:`FuseReport`.
    """
    check_kernels(kernels)
    _check_conv_impl(conv_impl)
    report = FuseReport(kernels)
    seen: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if type(module) in (LUConv, FusedConvBlock3d):
            reason = unsupported_reason(module.bn1, module.activation)
            if reason is not None:
                report.skipped.append((path, reason))
                return
            module.__class__ = FusedConvBlock3d
            module.set_kernels(kernels, conv_impl)
            report.fused.append(FusedBlock(path, "conv_block", ("conv1", "bn1", "activation"),
                                           norm_kind(module.bn1), act_kind(module.activation)))
            return
        for name, child in module.named_children():
            visit(child, _join(path, name))
        if type(module) in (nn.Sequential, FusedSequential):
            runs = _runs(module, path, report)
            if runs or type(module) is FusedSequential:
                FusedSequential.convert(module, runs, kernels, conv_impl)

    visit(model, "")
    return report


def fused_block_counts(model: nn.Module, device: torch.device) -> dict[str, str]:
    """How many conv blocks of ``model`` run fused in training on ``device``: ``{"conv": "a/n", "norm_act": "b/n"}``
    over its n conv blocks (``LUConv`` / ``FusedConvBlock3d``). ``norm_act``: the block's norm + activation run
    the kernels (kernels="triton", a norm and activation they implement: not SyncBatchNorm, a device they run
    on); ``conv``: of those, the ones whose 3x3x3 convolution also produces the BatchNorm statistics
    (conv3d_bn_stats)."""
    runs_kernels = kernels_run_on(device)
    total = norm_act = conv = 0
    for m in model.modules():
        if not isinstance(m, LUConv | FusedConvBlock3d):
            continue
        total += 1
        if not runs_kernels or getattr(m, "kernels", "torch") != "triton" or unsupported_reason(m.bn1, m.activation):
            continue
        norm_act += 1
        conv += conv_gives_stats(m.conv1, m.bn1)
    return {"conv": f"{conv}/{total}", "norm_act": f"{norm_act}/{total}"}
