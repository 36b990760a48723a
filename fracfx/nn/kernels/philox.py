"""Counter-based rounding noise: Philox4x32-10 in plain torch int64 ops.

The same function as the C++ kernel (quant_kernels.cpp), bit for bit, on any device: the eager
fallback and the tests use it. Element i of a quantizer call gets 16 bits of Philox block
b = (i // 128) * 16 + i % 16 (counter = (b low, b high, step low, step high), key = (seed low,
seed high)): lane j = (i % 128) // 16 takes bits 16 * (j % 2) .. of output word j // 2, read as a
signed k in [-32768, 32767] (tiles of 16 blocks keep the C++ loops plain SIMD loops), and

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
BLOCKS = 16  # Philox blocks per tile (kBlocks in quant_kernels.cpp)
TILE = BLOCKS * 8  # elements per tile: each block gives 8 16-bit values


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


def rounding_noise(numel: int, counter: torch.Tensor, seed: int) -> torch.Tensor:
    """(numel,) float32 noise for (seed, counter) (an int and a one-element integer tensor), on counter's device."""
    device = counter.device
    step = counter.reshape(()).to(torch.int64)
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    s0, s1 = _split(step)
    tiles = (numel + TILE - 1) // TILE
    blocks = torch.arange(tiles * BLOCKS, dtype=torch.int64, device=device)
    b0, b1 = blocks & _MASK, (blocks >> 32) & _MASK
    words = philox4x32(b0, b1, s0.expand_as(b0), s1.expand_as(b0), k0, k1)
    # lane j of a tile's blocks: bits 16 * (j % 2) of word j // 2; a tile is laid out lane-major
    lanes = torch.stack([(words[j // 2] >> (16 * (j % 2))) & 0xFFFF for j in range(8)])  # (8, tiles * BLOCKS)
    halves = lanes.view(8, tiles, BLOCKS).transpose(0, 1).reshape(-1)[:numel]
    k = halves - ((halves >= 32768).to(torch.int64) << 16)
    return k.to(torch.float32).add_(0.5).mul_(1.0 / NOISE_STEPS)
