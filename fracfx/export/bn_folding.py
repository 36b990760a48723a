"""Fold an eval BatchNorm into a quantized conv's per-channel int8 weights, scales and int32 bias.

A frozen weight is w = (q - zp) * s_w[c] with integer codes q and per-channel zero points. With
v = q - zp (|v| <= 2^b - 1, so b <= 7 bits fit int8 as they are) and a BatchNorm that follows,

    bn(conv(x, w) + b) = conv(x, v * (s_w * a)) + (b - mean) * a + beta,   a = gamma / sqrt(var + eps)

so the per-channel factor moves into the weight scale exactly. A negative factor flips the sign
of that channel's integer weights (v -> -v, still in range) and keeps the scale positive. The
bias becomes int32 in units of s_x * s_w'[c], as QLinearConv adds it to the accumulator.

Headroom (`limit`): the u8 x s8 kernels of CPUs without VNNI (AVX2, AVX-512 without VNNI) add
pairs of u8 * s8 products in int16 with saturation (vpmaddubsw), so a pair must stay within
32767: max_code_x * 2 * max|v| <= 32767. For 8-bit activations that is |v| <= 64 (7-bit
weights, what onnxruntime's reduce_range does); activations of 7 bits or fewer leave the full
int8 range. A channel over the limit (also any 8-bit asymmetric channel whose zero point is not
128: |q - zp| reaches 255 - zp) either has its few outermost codes clipped to the limit or is
re-quantized onto [-limit, limit] with a coarser step, whichever changes its weights less (L2);
`FoldedWeight.requantized` counts them. VNNI (vpdpbusd) accumulates in int32 and
needs no limit beyond int8's 127.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fracfx.nn.frozen import FrozenWeight

INT8_LIMIT = 127
INT16_MAX = 32767
BIAS_LIMIT = 2**30  # int32 bias with room for the accumulator


def headroom_limit(max_code_x: int, *, vnni: bool) -> int:
    """Largest |int8 weight| whose u8 x s8 pair sums cannot saturate int16 (module docstring)."""
    return INT8_LIMIT if vnni else min(INT8_LIMIT, INT16_MAX // (2 * max(1, max_code_x)))


@dataclasses.dataclass(frozen=True)
class FoldedWeight:
    values: torch.Tensor  # int64 holding int8 values, same shape as the weight
    scale: torch.Tensor  # float32 [C_out], positive
    bias: torch.Tensor  # float64 [C_out]: the real bias after folding
    requantized: int  # channels re-quantized to fit `limit`
    folded_bn: bool


def bn_factors(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) with bn(y) = y * a + c per channel, in float64."""
    inv = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    a = bn.weight.detach().double() * inv if bn.affine else inv
    c = (bn.bias.detach().double() if bn.affine else 0.0) - bn.running_mean.double() * a
    return a, c


def fold(weight: FrozenWeight, bias: torch.Tensor | None, bn: nn.Module | None, *, limit: int) -> FoldedWeight:
    """The int8 weight, positive per-channel scale and real bias of conv (+ bn) (module docstring)."""
    if weight.axis != 0:
        raise ValueError(f"weights quantized along axis {weight.axis}; the fast format needs per-output-channel (axis 0)")
    shape = (-1,) + (1,) * (weight.codes.dim() - 1)
    v = (weight.codes.long() - weight.zero_point.long().view(shape))
    scale = weight.scale.double().clone()
    real_bias = torch.zeros(v.shape[0], dtype=torch.float64) if bias is None else bias.detach().double().clone()
    if bn is not None:
        a, c = bn_factors(bn)
        sign = torch.where(a < 0, -1, 1).long()
        v = v * sign.view(shape)
        scale = scale * a.abs()
        real_bias = real_bias * a + c
    over = v.abs().reshape(v.shape[0], -1).amax(dim=1) > limit
    requantized = int(over.sum())
    if requantized:
        # per channel, the smaller weight change (L2) of: clip the few codes beyond the limit, or
        # re-round every code onto a coarser step peak / limit
        real = v.double() * scale.view(shape)
        peak = real.abs().reshape(v.shape[0], -1).amax(dim=1)
        new_scale = torch.where(over, peak / limit, scale)
        rounded = torch.round(real / new_scale.view(shape)).long()
        clipped = v.clamp(-limit, limit)
        err_round = ((rounded.double() * new_scale.view(shape) - real) ** 2).reshape(v.shape[0], -1).sum(dim=1)
        err_clip = ((clipped.double() * scale.view(shape) - real) ** 2).reshape(v.shape[0], -1).sum(dim=1)
        use_round = over & (err_round < err_clip)
        v = torch.where(use_round.view(shape), rounded, clipped)
        scale = torch.where(use_round, new_scale, scale)
    dead = scale <= 0  # a zero BatchNorm factor: the channel is its bias alone
    v = torch.where(dead.view(shape), torch.zeros_like(v), v)
    scale = torch.where(dead, torch.ones_like(scale), scale)
    return FoldedWeight(v.clamp(-limit, limit), scale.float(), real_bias, requantized, bn is not None)


def int32_bias(real_bias: torch.Tensor, x_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    """round(bias / (s_x * s_w[c])) as int64 (the accumulator's units), checked against int32."""
    unit = torch.tensor(x_scale, dtype=torch.float32).double() * w_scale.double()
    q = torch.round(real_bias / unit)
    if q.abs().max().item() > BIAS_LIMIT:
        raise ValueError(
            f"a folded bias is {q.abs().max().item():.3g} accumulator units (> 2^30): the activation or weight step is "
            "too small for an int32 bias; export this model with format='int8'"
        )
    return q.long()
