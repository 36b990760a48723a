"""Small models and a calibrated-transform helper shared by the export tests."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

import fracfx
from fracfx.export import calibrate


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class TinyResNet(nn.Module):
    """A CIFAR-style ResNet in miniature: stem, two stages, average pool, classifier (with bias)."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=True)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TokenMixer(nn.Module):
    """Linear layers on 3-D tokens and a matmul of two activations (no softmax)."""

    def __init__(self, dim: int = 16, tokens: int = 6):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.out = nn.Linear(tokens * tokens, 5)

    def forward(self, x):
        scores = torch.matmul(self.q(x), self.k(x).transpose(1, 2))
        return self.out(scores.flatten(1))


def settle_batchnorm(model: nn.Module, shape, batches: int = 3, seed: int = 7) -> nn.Module:
    """Give an untrained model real BatchNorm statistics (train-mode passes on N(0,1) inputs)."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn((16,) + tuple(shape), generator=generator))
    return model.eval()


def calibrated(model: nn.Module, shape, bits: int, *, keep_fp32=("@last",), seed: int = 1):
    """transform at (bits, bits), activation ranges calibrated on seeded N(0, 1) batches."""
    config = fracfx.QuantConfig(act_bits=bits, weight_bits=bits, keep_fp32=keep_fp32)
    gm = fracfx.transform(model, config, example_inputs=torch.zeros((1,) + tuple(shape)))
    generator = torch.Generator().manual_seed(seed)
    return calibrate(gm, [torch.randn((16,) + tuple(shape), generator=generator) for _ in range(3)])


def inputs(count: int, shape, seed: int = 2) -> torch.Tensor:
    return torch.randn((count,) + tuple(shape), generator=torch.Generator().manual_seed(seed))
