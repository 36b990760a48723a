"""What the model sweeps (torchvision, timm) share: their thread setting and the coverage check
(every conv/linear quantized or reported FP32)."""

import gc
import os

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FRACFX_TEST_THREADS", before)))
    yield
    torch.set_num_threads(before)
    gc.collect()


def _weight_modules(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def _is_covered(path: str, owners: set[str]) -> bool:
    return any(path == owner or path.startswith(owner + ".") for owner in owners)
