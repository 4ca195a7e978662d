"""MobileNetV1 for ImageNet (Howard et al. 2017), with the key names of the STR checkpoint.

The CHITA authors prune the dense MobileNetV1 checkpoint released with STR
(Kusupati et al. 2020; repository RAIVNLab/STR, ``models/mobilenetv1.py``). This
module reproduces that definition's layout (read from that file, not copied):

    model.0      conv-BN-ReLU   3 → 32, 3×3, stride 2        keys model.0.0 (conv), model.0.1 (BN)
    model.1..13  depthwise-separable blocks                  keys model.i.0 (3×3 depthwise conv),
                                                             model.i.1 (BN), model.i.3 (1×1 pointwise
                                                             conv), model.i.4 (BN)
    model.14     average pooling (no parameters)
    fc           1×1 convolution 1024 → num_classes, **no bias** (STR's builder.conv1x1)

All convolutions are bias-free. 4,230,976 parameters for 1000 classes (4,209,088 of them in
convolutions, 21,888 in BatchNorm). STR pools with ``AvgPool2d(7)`` (224×224 inputs only);
here the pooling is adaptive, which gives the same result on 224×224 inputs and also works
on small inputs (tests).
"""

from __future__ import annotations

import torch
import torch.nn as nn

# (in, out, stride) of the 13 depthwise-separable blocks
_BLOCKS = [
    (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
    (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
    (512, 1024, 2), (1024, 1024, 1),
]


def _conv_bn(inp: int, out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU(inplace=True),
    )


def _conv_dw(inp: int, out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),  # depthwise
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, out, 1, 1, 0, bias=False),  # pointwise
        nn.BatchNorm2d(out),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNetV1 (width 1.0): images (B, 3, H, W) → logits (B, num_classes)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.model = nn.Sequential(
            _conv_bn(3, 32, 2),
            *[_conv_dw(i, o, s) for i, o, s in _BLOCKS],
            nn.AdaptiveAvgPool2d(1),  # STR: AvgPool2d(7) on 7×7 maps
        )
        self.fc = nn.Conv2d(1024, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model(x)  # (B, 1024, 1, 1)
        x = self.fc(x)  # (B, num_classes, 1, 1)
        return x.flatten(1)  # (B, num_classes)


def mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    """MobileNetV1 for ImageNet with the STR checkpoint's key names (see the module docstring)."""
    return MobileNetV1(num_classes)
