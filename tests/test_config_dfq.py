"""DFQConfig: canonical candidates, explicit skip / FP32, messages that name the fix."""

import json

import pytest

import fracfx
from fracfx.config import CIFAR_CANDIDATES, config_from_dict
from fracfx.errors import ConfigError


def test_defaults_are_the_cifar_setup_and_round_trip():
    config = fracfx.DFQConfig()
    assert config.weight_bits == 4 and config.candidates == CIFAR_CANDIDATES
    assert config.keep_fp32 == ("@first", "@last") and config.embed_dims == (32, 16) and config.hidden == 16
    odd = fracfx.DFQConfig(candidates=[[4, 8], "skip", (0, 0), (0, 8)], embed_dims=[40], hidden=20, block_globs=["layer*.*"])
    assert odd.candidates == ((4, 8), "skip", "fp32", (0, 8))  # (0, 0) is read as "fp32"
    assert config_from_dict(json.loads(json.dumps(odd.to_dict()))) == odd


@pytest.mark.parametrize("changes, message", [
    ({"candidates": ("fp33",)}, "did you mean 'fp32'"),
    ({"candidates": ((4, 8, 2),)}, r"\(act_bits, grad_bits\) pair"),
    ({"candidates": ((4, 17),)}, "grad_bits=17 is outside"),
    ({"candidates": ((4, 8), (4, 8))}, "repeats"),
    ({"candidates": ("fp32", (0, 0))}, "repeats"),
    ({"candidates": ()}, "empty"),
    ({"candidates": "skip"}, "sequence of candidates"),
    ({"embed_dims": ()}, "embed_dims"),
    ({"embed_dims": (32, 0)}, "positive int"),
    ({"hidden": 0}, "hidden"),
    ({"block_types": "BasicBlock"}, r"\('BasicBlock',\)"),
    ({"quantize": ("conv", "lstm")}, "unknown op kind"),
])
def test_invalid_values_are_refused_with_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        fracfx.DFQConfig(**changes)
