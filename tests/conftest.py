"""Shared test setup: deterministic seeds and one intra-op thread.

Tests use small tensors, for which a second thread costs more in synchronisation than it
saves, and badly so on a loaded 2-core machine; benchmarks (fracfx bench) choose their own.
"""

import random

import numpy as np
import pytest
import torch


torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a test that asked for more threads does not leak them into the next
    yield
