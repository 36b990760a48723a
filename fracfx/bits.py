"""Validation of bit widths, shared by configs, modules and the runtime.

A bit width is an int in 1..16; 0 or None means "leave in FP32".
"""

from __future__ import annotations

from fracfx.errors import ConfigError

MAX_BITS = 16
FP32 = 0  # the bit width that means "not quantized"


def check_bits(value: int | None, what: str) -> int:
    """Return `value` as an int bit width (0 for FP32) or raise ConfigError."""
    if value is None:
        return FP32
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an int in 1..{MAX_BITS} (0 or None for FP32), got {value!r}")
    if not 0 <= value <= MAX_BITS:
        raise ConfigError(
            f"{what}={value} is outside 1..{MAX_BITS}; use 1..{MAX_BITS} bits, or 0/None to keep FP32"
        )
    return value


def cost_bits(bits: int) -> int:
    """Bits as the cost model counts them: FP32 counts as 32."""
    return 32 if bits == FP32 else bits
