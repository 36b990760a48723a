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
re-quantized onto [-limit, limit] with a coarser step, whichever changes the conv's output less:
with calibration data (`moments`, fracfx.export.weight_rounding) both candidates are rounded
with error feedback and compared by the output error they cause on that data, and the bias takes
back the shift of the output's mean the change causes (bias correction); without, they are
rounded to nearest and compared by the weights' L2 change. `FoldedWeight.requantized` counts
them. VNNI (vpdpbusd) accumulates in int32 and needs no limit beyond int8's 127.

Bias precision (`finer_bias_unit`): QLinearConv adds an int32 bias in units of s_x * s_w[c], so
the folded bias is rounded by up to half a unit; with 4-bit weights (|v| <= 15) a unit is a
visible fraction of an output step, enough to move codes that sit near a rounding boundary.
Multiplying a channel's integer weights by 2^j (as far as the limit allows) and dividing its
scale by 2^j keeps the same real weights, exactly (a power of two), and makes the unit 2^j times
finer.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fracfx.export.weight_rounding import InputMoments, output_error, round_with_feedback
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


def centered_codes(weight: FrozenWeight) -> torch.Tensor:
    """The integer weights q - zp (int64), per output channel (axis 0)."""
    return weight.codes.long() - weight.zero_point.long().view((-1,) + (1,) * (weight.codes.dim() - 1))


def fold(weight: FrozenWeight, bias: torch.Tensor | None, bn: nn.Module | None, *, limit: int, moments: InputMoments | None = None) -> FoldedWeight:
    """The int8 weight, positive per-channel scale and real bias of conv (+ bn) (module docstring).

    moments: the conv's input patches over calibration data (weight_rounding.input_moments), or None.
    """
    if weight.axis != 0:
        raise ValueError(f"weights quantized along axis {weight.axis}; the fast format needs per-output-channel (axis 0)")
    shape = (-1,) + (1,) * (weight.codes.dim() - 1)
    v = centered_codes(weight)
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
        # per channel, whichever changes the output less (module docstring): keep the step and clip
        # the few codes beyond the limit, or re-round every code onto the coarser step peak / limit.
        # Errors are compared in units of the channel's old step (the same factor for both candidates).
        hessian = None if moments is None else moments.covariance  # the mean's part goes into the bias below
        flat = v.reshape(v.shape[0], -1).double()
        ratio = torch.where(over, flat.abs().amax(dim=1) / limit, torch.ones_like(scale))  # new step / old step
        rounded = round_with_feedback(flat / ratio[:, None], limit, hessian)
        clipped = round_with_feedback(flat, limit, hessian)
        use_round = over & (output_error(rounded * ratio[:, None] - flat, hessian) < output_error(clipped - flat, hessian))
        new = torch.where(use_round[:, None], rounded, clipped)
        if moments is not None:
            real_bias = real_bias - moments.mean_shift((new * torch.where(use_round, ratio, 1.0)[:, None] - flat) * scale[:, None])
        v = new.long().view(v.shape)
        scale = torch.where(use_round, scale * ratio, scale)
    dead = scale <= 0  # a zero BatchNorm factor: the channel is its bias alone
    v = torch.where(dead.view(shape), torch.zeros_like(v), v)
    scale = torch.where(dead, torch.ones_like(scale), scale)
    return FoldedWeight(v.clamp(-limit, limit), scale.float(), real_bias, requantized, bn is not None)


def finer_bias_unit(folded: FoldedWeight, limit: int, x_scale: float) -> FoldedWeight:
    """The same real weights with each channel's integers times 2^j <= limit / max|v| and its scale / 2^j (module docstring).

    All-zero channels keep factor 1, and no factor takes the int32 bias past BIAS_LIMIT / 2.
    """
    values = folded.values
    peak = values.abs().reshape(values.shape[0], -1).amax(dim=1)
    units = (folded.bias.abs() / (float(x_scale) * folded.scale.double())).clamp(min=1.0)
    room = torch.minimum(limit / peak.clamp(min=1).double(), BIAS_LIMIT / 2 / units)
    factor = torch.where(peak > 0, 2 ** torch.floor(torch.log2(room)).clamp(min=0), torch.ones_like(room)).long()
    factor = torch.where(factor * peak > limit, factor // 2, factor).clamp(min=1)  # log2 rounding at an exact power of two
    shape = (-1,) + (1,) * (values.dim() - 1)
    return dataclasses.replace(folded, values=values * factor.view(shape), scale=folded.scale / factor.float())


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
