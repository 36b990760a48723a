"""Precision controls over every quantizer of a model: the bits in force and the rounding seeds.

A leaf next to the quantizers it drives, so the runtime (PFQ scheduler) and the public API
(fracfx.set_bits, fracfx.seed_rounding) share one implementation without importing each other.
"""

from __future__ import annotations

from torch import nn

from fracfx.bits import check_bits
from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant


def set_bits(gm: nn.Module, act_bits: int | None = None, weight_bits: int | None = None, grad_bits: int | None = None) -> None:
    """Set every quantizer of one kind at once. None leaves that kind as it is; 0 means FP32."""
    for kind, bits in ((ActQuant, act_bits), (WeightQuant, weight_bits), (GradQuant, grad_bits)):
        if bits is None:
            continue
        bits = check_bits(bits, f"{kind.__name__} bits")
        for module in gm.modules():
            if type(module) is kind:
                module.set_bits(bits)


def seed_rounding(gm: nn.Module, seed: int) -> None:
    """Seed every stochastic-rounding generator (each gets a distinct stream derived from seed)."""
    for index, module in enumerate(m for m in gm.modules() if isinstance(m, GradQuant)):
        module.seed(seed * 1_000_003 + index)
