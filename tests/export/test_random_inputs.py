"""Seeded verify inputs: N(0, 1) for float inputs, valid token ids for a language model's."""

import pytest
import torch
from torch import nn

from fracfx.errors import ExportError
from fracfx.export import random_inputs


def test_float_inputs_are_seeded_normal_samples_shaped_like_the_example():
    model = nn.Linear(3, 2)
    (a,) = random_inputs(model, torch.zeros(1, 5, 3), 64, seed=1)
    (b,) = random_inputs(model, torch.zeros(1, 5, 3), 64, seed=1)
    assert a.shape == (64, 5, 3) and a.dtype == torch.float32 and torch.equal(a, b)
    assert abs(float(a.mean())) < 0.1 and abs(float(a.std()) - 1) < 0.1


def test_integer_inputs_are_ids_of_the_token_embedding():
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    (ids,) = random_inputs(model, torch.zeros(1, 16, dtype=torch.int64), 256)
    assert ids.shape == (256, 16) and ids.dtype == torch.int64
    assert int(ids.min()) == 0 and int(ids.max()) == 6  # every id of the vocabulary, none outside it


def test_integer_inputs_without_an_embedding_name_the_way_out():
    with pytest.raises(ExportError, match="verify_inputs"):
        random_inputs(nn.Linear(3, 2), torch.zeros(1, 3, dtype=torch.int64), 4)
