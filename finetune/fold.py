"""BatchNorm folded into the convolution before it, for inference on a frozen network.

In eval mode a BatchNorm after a convolution is an affine map per channel, which the
convolution's weights and bias can absorb: the same function, without a pass over every
activation. Measured on the feature pass of efficientnet_lite0 (BENCHMARKS.md), BatchNorm
was a quarter of the time on a 2-core CPU.

The stages that train the backbone (the tail, fine-tuning) keep BatchNorm's statistics frozen,
so there too it is an affine map per channel, and `folded_while_frozen` computes it inside the
convolution while they run, weights and all still learning.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .device import exact_fp32

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
    with torch.inference_mode(), exact_fp32():
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
        weight, bias = folded_weights(conv, bn)
        conv.weight.copy_(weight)
        conv.bias = nn.Parameter(bias, requires_grad=False)


def folded_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of the one convolution that computes conv then bn in eval mode
    (differentiable in both modules' parameters)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1))), bias


@contextlib.contextmanager
def folded_while_frozen(model: nn.Module, check: Callable[[], torch.Tensor]) -> Iterator[bool]:
    """Within the block, each BatchNorm that directly follows a convolution (`foldable`) is computed
    inside that convolution whenever it is in eval mode, as the tail stage and fine-tuning keep it:
    the convolution runs with its weights scaled and a bias (a few thousand numbers a step) instead
    of BatchNorm passing over every activation, forward and backward (a tail step of
    efficientnet_lite0 on a 2-core CPU: about a fifth less time). The same function and the same
    gradients, BatchNorm's scale and shift included, to float rounding; no parameter, buffer or
    state-dict key changes. A BatchNorm in training mode works as it always does. Yields whether
    it is in use: not where `check()` (the model's output on a probe, run here in eval mode) differs
    with it, as registration order is usually, not always, the order of the forward pass."""
    pairs = [(getattr(model.get_submodule(p), c), getattr(model.get_submodule(p), b)) for p, c, b in foldable(model)]
    try:
        yield bool(pairs) and _patched_if_unchanged(model, pairs, check)
    finally:
        _unpatch(pairs)


def _patched_if_unchanged(model: nn.Module, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]], check: Callable[[], torch.Tensor]) -> bool:
    """Patch the pairs (_patch) and keep them where `check()` gives the same in eval mode; each
    module's mode as it was."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), exact_fp32():
            expected = check().float()
            _patch(pairs)
            got = check().float()
    finally:
        for m, training in modes.items():
            m.training = training
    if ((expected - got).abs().max() / expected.abs().max().clamp_min(1e-6)) > TOLERANCE:
        _unpatch(pairs)
        return False
    return True


def _patch(pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> None:
    for conv, bn in pairs:  # (instance attributes: the modules, their names and their state stay as they are)
        conv.forward = functools.partial(_conv_and_frozen_bn, conv, bn)
        bn.forward = _unchanged


def _unpatch(pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> None:
    for conv, bn in pairs:
        conv.__dict__.pop("forward", None)
        bn.__dict__.pop("forward", None)


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def _conv_and_frozen_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """conv then bn; computed as one convolution when bn is in eval mode (folded_weights)."""
    if bn.training:
        return type(bn).forward(bn, type(conv).forward(conv, x))
    pad = getattr(conv, "pad", None)  # (effnet_lite's SameConv2d pads before its convolution)
    return conv._conv_forward(pad(x) if pad else x, *folded_weights(conv, bn))
