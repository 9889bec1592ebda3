"""FLOPs of the PCRLv2 network: per reported layer and per training step, counted from the shapes.

A multiply-add counts 2 FLOPs and biases are not counted, as ``torch.utils.flop_counter`` counts them;
``model_flops`` is that counter's total, and ``layer_flops`` counts the same passes layer by layer from the
shapes each convolution and linear layer sees (the tests check that the two agree). The convention for a step
is the model's full cost: forward and backward of the two global views and the batched local views, every
output back-propagated. A real step's random scale choice skips some heads' backward, so the achieved rate is
a slight overestimate for those heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..models import NonSkipUNet2D, NonSkipUNet3D

# (input shape, local) of the forward passes of one step.
Passes = Sequence[tuple[tuple[int, ...], bool]]


def step_passes(batch: int, global_out: Sequence[int], local_out: Sequence[int], n_local: int,
                channels: int = 1) -> list:
    """The three forward passes of a step of ``batch`` samples: x1, x2, and the local views batched."""
    return [((batch, channels, *global_out), False), ((batch, channels, *global_out), False),
            ((batch * n_local, channels, *local_out), True)]


def reported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks the profiler reports: each conv block (convolution + norm + activation: the encoder's and
    decoder's, and the deep-supervision heads), each up-convolution, each predictor head and the output
    convolution. They do not nest, and together they hold every convolution and linear layer of the network."""
    if isinstance(model, NonSkipUNet2D):
        # The encoder's stem and basic blocks; per decoder block its two conv layers and three heads; the output.
        return [(name, m) for name, m in model.named_modules()
                if name == "model.encoder.conv1" or _is_basic_block(name)
                or name.rsplit(".", 1)[-1] in ("conv1", "conv2", "deep_supervision_head", "predictor_head")
                and name.startswith("model.decoder.") or name == "model.segmentation_head"]
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "conv1", None), nn.Conv3d) or name.endswith("up_conv")
            or name.endswith("predictor_head") or name == "out_tr"]


def _is_basic_block(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and parts[:2] == ["model", "encoder"] and parts[2].startswith("layer")


def _forward_flops(op: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one convolution or linear layer's forward, as the flop counter counts them."""
    if isinstance(op, nn.Linear):
        return 2 * (x.numel() // x.shape[-1]) * op.in_features * op.out_features
    spatial = x.shape[2:] if isinstance(op, nn.ConvTranspose3d) else y.shape[2:]
    return 2 * x.shape[0] * math.prod(spatial) * math.prod(op.weight.shape)


def _plain_copy(model: nn.Module) -> nn.Module:
    """The same architecture on the meta device, unfused (shapes only: nothing is allocated or computed)."""
    with torch.device("meta"):
        if isinstance(model, NonSkipUNet2D):
            return NonSkipUNet2D(n_class=model.n_class, in_channels=model.in_channels).eval()
        plain = NonSkipUNet3D(n_class=model.n_class, act=model.act, norm=model.norm, in_channels=model.in_channels,
                              width=model.width)
    return plain.eval()  # batch norm then takes any batch size; the FLOPs are the same


def _run_passes(model: nn.Module, passes: Passes) -> None:
    for shape, local in passes:
        restoration, feats, masks = model(torch.randn(*shape, device="meta"), local=local)
        outputs = [t for t in (restoration, *masks, *(t for pair in feats for t in pair)) if t is not None]
        sum(t.sum() for t in outputs).backward()


def layer_flops(model: nn.Module, passes: Passes) -> dict[str, int]:
    """{reported layer: forward + backward FLOPs} over ``passes``. Backward counts the weight gradient and,
    when the layer's input needs one, the input gradient (each as many FLOPs as the forward); a layer whose
    output gets no gradient (the local views' deep-supervision heads) has no backward."""
    plain = _plain_copy(model)
    totals = {name: 0 for name, _ in reported_layers(plain)}
    handles = []

    def count(name: str):
        def hook(op, inputs, output):
            flops = _forward_flops(op, inputs[0], output)
            totals[name] += flops
            grads = 1 + int(inputs[0].requires_grad)
            if output.requires_grad:
                output.register_hook(lambda grad: totals.__setitem__(name, totals[name] + grads * flops))
        return hook

    for name, layer in reported_layers(plain):
        for op in layer.modules():
            if isinstance(op, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
                handles.append(op.register_forward_hook(count(name)))
    try:
        _run_passes(plain, passes)
    finally:
        for h in handles:
            h.remove()
    return totals


def model_flops(model: nn.Module, passes: Passes) -> int:
    """Forward + backward FLOPs of ``passes`` as ``torch.utils.flop_counter`` counts them."""
    plain = _plain_copy(model)
    counter = FlopCounterMode(display=False)
    with counter:
        _run_passes(plain, passes)
    return counter.get_total_flops()
