"""Counter-based rounding noise: Philox4x32-10 in plain torch int64 ops.

The same function as the C++ kernel (quant_kernels.cpp), bit for bit, on any device: the eager
fallback and the tests use it. Element i of a quantizer call gets 16 bits of the Philox block
i // 8 (counter = (i // 8 low, high, step low, high), key = (seed low, high)): lane j = i % 8 takes
bits 16 * (j % 2) .. of output word j // 2, read as a signed k in [-32768, 32767], and

    u = (k + 0.5) / 65536      in (-0.5, 0.5), exactly symmetric around 0 (unbiased rounding)

No state besides (seed, step): identical for any thread count, chunking or device, and a resumed
run regenerates exactly the noise an uninterrupted one would have used.
"""

from __future__ import annotations

import torch

NOISE_STEPS = 65536  # 16-bit resolution: u is a multiple of 1/65536 plus 1/131072
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF
ROUNDS = 10


def _split(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return value & _MASK, (value >> 32) & _MASK


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values (broadcasting); returns 4 words."""
    for _ in range(rounds):
        p0 = c0 * _M0  # < 2^64: int64 wraps, the low 64 bits are exact
        p1 = c2 * _M1
        hi0, lo0 = (p0 >> 32) & _MASK, p0 & _MASK
        hi1, lo1 = (p1 >> 32) & _MASK, p1 & _MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK
        k1 = (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def rounding_noise(numel: int, key: torch.Tensor) -> torch.Tensor:
    """(numel,) float32 noise for key = int64 tensor [seed, step], on key's device."""
    device = key.device
    key = key.to(torch.int64)
    seed, step = key[0], key[1]
    k0, k1 = _split(seed)
    s0, s1 = _split(step)
    blocks = torch.arange((numel + 7) // 8, dtype=torch.int64, device=device)
    b0, b1 = blocks & _MASK, (blocks >> 32) & _MASK
    words = torch.stack(philox4x32(b0, b1, s0.expand_as(b0), s1.expand_as(b0), k0, k1), dim=1)  # (blocks, 4)
    halves = torch.stack((words & 0xFFFF, (words >> 16) & 0xFFFF), dim=2).reshape(-1)[:numel]  # lane order
    k = halves - ((halves >= 32768).to(torch.int64) << 16)
    return k.to(torch.float32).add_(0.5).mul_(1.0 / NOISE_STEPS)
