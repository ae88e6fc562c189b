"""BatchNorm folded into the convolution before it, for inference on a frozen network.

In eval mode a BatchNorm after a convolution is an affine map per channel, which the
convolution's weights and bias can absorb: the same function, without a pass over every
activation. Measured on the feature pass of efficientnet_lite0 (BENCHMARKS.md), BatchNorm
was a quarter of the time on a 2-core CPU.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

TOLERANCE = 1e-3  # relative to the output's scale: beyond this, the folded copy is not used


def probe_images(size: int, device: torch.device) -> torch.Tensor:
    """Two seeded random images of this size on the device, channels-last: what `folded` checks the copy on."""
    probe = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return probe.contiguous(memory_format=torch.channels_last)


def folded(model: nn.Module, probe: torch.Tensor, forward=None) -> nn.Module:
    """A copy of `model` in eval mode where each BatchNorm that directly follows a convolution
    (among its parent's children, in the order they were registered) is folded into it; `model`
    itself when there is nothing to fold, or when the copy's output on `probe` (through
    `forward(net, probe)`, default `net(probe)`) differs from the model's: registration order is
    usually, not always, the order of the forward pass."""
    forward = forward or (lambda net, x: net(x))
    pairs = foldable(model)
    if not pairs:  # (no copy of a network without BatchNorm, a ViT's, say)
        return model
    copied = copy.deepcopy(model).eval()
    for parent, conv, bn in pairs:
        owner = copied.get_submodule(parent)
        fold_into(getattr(owner, conv), getattr(owner, bn))
        setattr(owner, bn, nn.Identity())
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        expected, got = forward(model, probe).float(), forward(copied, probe).float()
    model.train(was_training)
    scale = expected.abs().max().clamp_min(1e-6)
    return copied if ((expected - got).abs().max() / scale) <= TOLERANCE else model


def foldable(model: nn.Module) -> list[tuple[str, str, str]]:
    """(parent, convolution, BatchNorm) names of each BatchNorm registered right after a convolution of its width."""
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and conv.out_channels == bn.num_features
                    and bn.running_var is not None):
                pairs.append((parent_name, conv_name, bn_name))
    return pairs


def fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv then bn (eval) == the conv with scaled weights and a shifted bias."""
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
