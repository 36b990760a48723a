"""Fixed-precision quantizers: what freeze_precision puts in place of the training quantizers.

Both compute exactly what an ONNX QuantizeLinear -> Clip -> DequantizeLinear chain (or a
DequantizeLinear of stored integer codes) computes in onnxruntime, in FP32:

    q = clamp(round(x / s) + zp, 0, 2^b - 1)     (round half to even, x / s an IEEE division)
    y = (q - zp) * s

so the frozen GraphModule is the bit-level reference the exported file must reproduce. With
`centered` set (integer arithmetic, see fracfx.passes.integer_arithmetic) they return the
integer q - zp instead, and a FrozenAffine after the op applies the scales.

The integer zero-point grid. The training quantizer (docs/method.md section 1) uses the grid
lo + k * s with a real-valued lo; DequantizeLinear needs lo = -zp * s with an integer zp.
`integer_grid` moves lo to the nearest point of that form (the TensorFlow / PyTorch observer
"nudge"): the step s is kept exactly, so only the grid's offset moves, by at most s / 2. A range
that does not contain 0 (e.g. an all-positive weight channel) is first widened to include 0,
since an integer zero point in 0..2^b-1 puts 0 on the grid; that changes s for that range.
"""

from __future__ import annotations

import torch
from torch import nn

from fracfx.nn.quant import integer_grid, qmax_of, scale_of  # noqa: F401  (integer_grid re-exported)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes clamp(round(x / s) + zp, 0, qmax) as int64 (what QuantizeLinear + Clip store)."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, qmax_of(bits)).to(torch.int64)


class FrozenActQuant(nn.Module):
    """Per-tensor activation quantizer with a fixed scale and integer zero point (eval only)."""

    def __init__(self, bits: int, scale: torch.Tensor, zero_point: torch.Tensor, centered: bool = False):
        super().__init__()
        self.bits = int(bits)
        self.centered = bool(centered)
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int64).reshape(()).clone())

    @property
    def qmax(self) -> int:
        return qmax_of(self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zp = self.zero_point.to(x.dtype)
        q = torch.clamp(torch.round(x / self.scale) + zp, 0, self.qmax) - zp
        return q if self.centered else q * self.scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale.item():.6g}, zero_point={int(self.zero_point)}, centered={self.centered}"


class FrozenWeight(nn.Module):
    """A pre-quantized weight: integer codes, per-channel scale and zero point along `axis`.

    forward() takes no input and returns the dequantized FP32 weight (q - zp) * s.
    """

    def __init__(self, bits: int, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int = 0, centered: bool = False):
        super().__init__()
        self.bits = int(bits)
        self.axis = int(axis)
        self.centered = bool(centered)
        self.register_buffer("codes", codes.detach().to(torch.int32).clone())
        self.register_buffer("scale", scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).reshape(-1).clone())

    def _broadcast(self, v: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.codes.dim()
        shape[self.axis] = -1
        return v.view(shape)

    def forward(self) -> torch.Tensor:
        q = self.codes.float() - self._broadcast(self.zero_point).float()
        return q if self.centered else q * self._broadcast(self.scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, shape={tuple(self.codes.shape)}, axis={self.axis}, centered={self.centered}"


class FrozenAffine(nn.Module):
    """y = x * scale (+ shift): two separately rounded elementwise ops (ONNX Mul, Add), never an FMA.

    Rescales an integer-arithmetic op (scale = s_x * s_w per output channel, shift = bias) and
    stands in for an eval BatchNorm (scale = w / sqrt(var + eps), shift = b - mean * scale).
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("shift", None if shift is None else shift.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.mul(x, self.scale)
        return y if self.shift is None else torch.add(y, self.shift)

    def extra_repr(self) -> str:
        return f"scale={tuple(self.scale.shape)}, shift={self.shift is not None}"


FROZEN_TYPES = (FrozenActQuant, FrozenWeight)
