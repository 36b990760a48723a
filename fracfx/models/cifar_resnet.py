"""CIFAR ResNets of depth 6n+2 (He et al. 2016, section 4.2), as docs/method.md section 6 trains them.

Stem 3x3 conv 16 + BN + ReLU; three stages of n BasicBlocks with widths 16/32/64; stride 2 at
the start of stages 2 and 3, where the shortcut is a 1x1 conv + BN projection (FracTrain's
reference uses this "option B" shortcut, which is why ResNet-38/74 have 0.565M/1.150M
parameters rather than the option-A counts); global average pool; FC.

The pool is adaptive, so 28x28 inputs (Fashion-MNIST) work as well as 32x32 CIFAR images.
Plain PyTorch: no quantization code lives here.
"""

from __future__ import annotations

from torch import Tensor, nn

from fracfx.errors import ConfigError

STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    The residual add is written out as `out + shortcut` in this forward so that a traced graph
    shows it inside the block (DFQ finds gated blocks by that add).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 38, 56, 74, 110), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, STAGE_WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        width = STAGE_WIDTHS[0]
        stages = []
        for index, out_width in enumerate(STAGE_WIDTHS):
            first_stride = 1 if index == 0 else 2
            blocks = [BasicBlock(width, out_width, first_stride)]
            blocks += [BasicBlock(out_width, out_width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            width = out_width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _init_weights(model: nn.Module) -> None:
    # He init for convs (fan_out, as the reference and torchvision do); BN starts as identity.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def cifar_resnet8(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 (n = 1), about 0.08M parameters: sized for full-schedule runs on a 2-core CPU."""
    return CifarResNet(8, num_classes, in_channels)


def cifar_resnet14(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-14 (n = 2), about 0.17M parameters: sized for full-schedule runs on a 2-core CPU."""
    return CifarResNet(14, num_classes, in_channels)


def cifar_resnet20(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (n = 3), about 0.27M parameters: small enough for quick tests."""
    return CifarResNet(20, num_classes, in_channels)


def cifar_resnet38(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-38 (n = 6), about 0.565M parameters: FracTrain's CIFAR workhorse."""
    return CifarResNet(38, num_classes, in_channels)


def cifar_resnet74(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-74 (n = 12), about 1.150M parameters."""
    return CifarResNet(74, num_classes, in_channels)
