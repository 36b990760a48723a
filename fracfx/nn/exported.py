"""Small modules that give an exported (torch.export) graph back its train/eval switch.

torch.export bakes the model's mode at capture time into ATen calls (`aten.batch_norm(...,
training=True, ...)`, `aten.dropout(x, p, train=True)`); fracfx.passes.lower_aten replaces those
calls with these modules so that `.train()` / `.eval()` on the transformed model switch them as
they switch nn.BatchNorm and nn.Dropout. Parameters and running statistics stay where the
exported graph reads them (get_attr of the original paths); the modules hold only constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ModeBatchNorm(nn.Module):
    """F.batch_norm on the graph's own parameters and running statistics, in the module's mode."""

    def __init__(self, momentum: float, eps: float):
        super().__init__()
        self.momentum, self.eps = momentum, eps

    def forward(self, x, weight, bias, running_mean, running_var) -> torch.Tensor:
        return F.batch_norm(x, running_mean, running_var, weight, bias, self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, eps={self.eps}"
