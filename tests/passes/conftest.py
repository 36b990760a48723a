"""Small models the pass tests share."""

import pytest
import torch
from torch import nn


class ConvNet(nn.Module):
    """conv -> bn -> relu -> pool -> linear, plus a matmul of two activations: every op kind."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.bn(self.conv(x)).relu().mean((2, 3))
        z = self.fc(y)
        return torch.matmul(z.unsqueeze(2), z.unsqueeze(1)).flatten(1)


EXAMPLE = (torch.randn(2, 3, 6, 6),)


@pytest.fixture
def convnet():
    return ConvNet()


def force(gm, index):
    """Make every gate of a DFQ model pick candidate `index` (None: all logits equal, a tie everywhere)."""
    head = gm.get_submodule("fracfx_gate.head")
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        if index is not None:
            head.bias[index] = 10.0
