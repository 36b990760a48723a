"""Options and helpers that several methods share: bit widths, the plateau indicator, transforms."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fracfx.bits import check_bits
from fracfx.errors import ConfigError
from fracfx.train.config import Option
from fracfx.train.recipe import BuildContext


def check_schedule(value, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be a sequence of bit widths, got {value!r}")
    return tuple(check_bits(bits, name) for bits in value)


def check_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an int >= 0, got {value!r}")
    return value


def bits_option(name: str, default: int, help: str) -> Option:
    return Option(name, int, default, help, check=check_bits)


def bit_options(what: str = "", weight_default: int = 8) -> tuple[Option, ...]:
    """--act-bits, --weight-bits, --grad-bits (0 = FP32)."""
    return (
        bits_option("act_bits", 8, f"{what}activation bits, 0 = FP32"),
        bits_option("weight_bits", weight_default, "weight bits, 0 = FP32"),
        bits_option("grad_bits", 8, f"{what}gradient bits, 0 = FP32"),
    )


PLATEAU_OPTIONS = (
    Option("num_turning_point", int, 3, "stage switches N", check=check_count),
    Option("initial_threshold", float, 0.05, "plateau threshold eps (the CIFAR scripts use 0.15)", check=check_number),
    Option("decay", float, 0.3, "eps multiplier at the 1st and 2nd turning points (CIFAR scripts 0.4)", check=check_number),
)


def plateau_settings(context: BuildContext) -> dict:
    """The plateau indicator's keyword arguments (PFQScheduler, FracTrainScheduler)."""
    return {"num_turning_point": context.option("num_turning_point"), "initial_threshold": context.option("initial_threshold"),
            "decay": context.option("decay"), "window": context.plan.window, "reduce": context.ranks}


def keep_fp32(context: BuildContext) -> dict:
    """QuantConfig/DFQConfig keyword for --keep-fp32 (unset: the config's own default)."""
    return {} if context.config.keep_fp32 is None else {"keep_fp32": context.config.keep_fp32}


def quantized(model: nn.Module, example_input: torch.Tensor, context: BuildContext, act: int, weight: int, grad: int) -> nn.Module:
    """The model transformed at these bits, its rounding seeded by the run's seed."""
    from fracfx.api import transform
    from fracfx.nn.precision import seed_rounding
    from fracfx.config import QuantConfig

    config = QuantConfig(act_bits=act, weight_bits=weight, grad_bits=grad, stochastic_grad=context.config.stochastic_grad, **keep_fp32(context))
    gm = transform(model, config, example_inputs=example_input)
    seed_rounding(gm, context.config.seed)
    return gm


def fp32_graph(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """A transformed copy with 0-bit (FP32) quantizers everywhere: MAC counts and FP32 costs."""
    from fracfx.api import transform
    from fracfx.config import QuantConfig

    return transform(copy.deepcopy(model), QuantConfig(act_bits=0, weight_bits=0, grad_bits=0, keep_fp32=()), example_inputs=example_input)
