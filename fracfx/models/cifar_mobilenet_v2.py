"""MobileNetV2 for 32x32 inputs, as docs/method.md section 6 trains it (about 2.30M parameters).

Differences from the ImageNet network, as in FracTrain's reference: the stem is a stride-1 3x3
conv with 32 channels, the second stage keeps stride 1, activations are ReLU (not ReLU6), and a
stride-1 block whose width changes gets a 1x1 conv + BN projection shortcut (so every stride-1
block is residual). Then a 1x1 conv to 1280, global average pool (adaptive, so 28x28 works) and
a linear classifier. Plain PyTorch: no quantization code lives here.
"""

from __future__ import annotations

from torch import Tensor, nn

# (expansion, out_channels, blocks, stride of the first block)
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


class InvertedResidual(nn.Module):
    """expand 1x1 - depthwise 3x3 - project 1x1 (linear bottleneck), residual when stride is 1.

    The residual add is written out as `out + shortcut` in this forward so that a traced graph
    shows it inside the block (DFQ finds gated blocks by that add).
    """

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int):
        super().__init__()
        hidden = in_channels * expansion
        self.body = nn.Sequential(
            *_conv_bn(in_channels, hidden, 1), nn.ReLU(inplace=True),
            *_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden), nn.ReLU(inplace=True),
            *_conv_bn(hidden, out_channels, 1),
        )
        self.residual = stride == 1
        self.shortcut = None
        if self.residual and in_channels != out_channels:
            self.shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        if not self.residual:
            return out
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return out + shortcut


class CifarMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, STEM_CHANNELS, 3), nn.ReLU(inplace=True))
        blocks, width = [], STEM_CHANNELS
        for expansion, out_channels, count, stride in STAGES:
            for index in range(count):
                blocks.append(InvertedResidual(width, out_channels, expansion, stride if index == 0 else 1))
                width = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*_conv_bn(width, HEAD_CHANNELS, 1), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(HEAD_CHANNELS, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.avgpool(x).flatten(1))


def cifar_mobilenet_v2(*, num_classes: int = 10, in_channels: int = 3) -> CifarMobileNetV2:
    return CifarMobileNetV2(num_classes, in_channels)
