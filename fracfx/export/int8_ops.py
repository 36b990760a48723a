"""The ops of the fast int8 format: each one runs in PyTorch (the reference) and writes its ONNX.

Every op reads and writes named values. A value is either float32 or "codes": uint8 integers
q with a (scale, zero point) meaning (q - zp) * scale, held in the reference as float32 tensors of
integers. Pairing `run` (PyTorch) with `emit` (ONNX) in one class keeps the reference and the file
describing the same arithmetic:

    Quantize     QuantizeLinear [+ Clip]           clamp(round(x / s) + zp, lo, hi)
    Dequantize   DequantizeLinear                  (q - zp) * s
    ClipCodes    Clip on uint8                     clamp(q, lo, hi) (ReLU/ReLU6 on codes, b-bit carriers)
    QConv        QLinearConv [+ Clip]              int32 acc = conv(q_x - zp_x, w) + bias_i32 (exact);
                                                   y = clamp(round(float32(acc) * m_c) + zp_y, lo, hi),
                                                   m_c = float32(float32(s_x * s_w[c]) / s_y)
    QLinearFloat MatMulInteger, Cast, Mul [, Add]  float32(acc) * float32(s_x * s_w[c]) (+ bias)

onnxruntime's QLinearConv requantizes exactly so (MlasRequantizeOutput: float multiply, round to
nearest even, clamp). The integer accumulation is computed in float64 here (exact below 2^53).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F


class Builder:
    """Collects ONNX nodes and initializers with short unique names."""

    def __init__(self):
        self.nodes, self.inits, self._count = [], [], 0

    def const(self, array, name: str = "c") -> str:
        from onnx import numpy_helper

        self._count += 1
        full = f"{name}_{self._count}"
        self.inits.append(numpy_helper.from_array(np.asarray(array), full))
        return full

    def node(self, op: str, inputs, output: str | None = None, *, domain: str = "", **attrs) -> str:
        from onnx import helper

        self._count += 1
        output = output or f"{op.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=f"{op}_{len(self.nodes)}", domain=domain, **attrs))
        return output


def _f32(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32)


def _clip_codes(b: Builder, q: str, lo: int, hi: int, out: str) -> str:
    return b.node("Clip", [q, b.const(np.uint8(lo), "lo"), b.const(np.uint8(hi), "hi")], out)


@dataclasses.dataclass
class Quantize:
    x: str
    out: str
    scale: float
    zp: int
    lo: int = 0
    hi: int = 255

    def run(self, env):
        q = torch.round(env[self.x] / _f32(self.scale)) + self.zp
        env[self.out] = torch.clamp(q, self.lo, self.hi)

    def emit(self, b: Builder):
        full = (self.lo, self.hi) == (0, 255)
        q = b.node("QuantizeLinear", [self.x, b.const(np.float32(self.scale), "s"), b.const(np.uint8(self.zp), "zp")], self.out if full else None)
        if not full:
            _clip_codes(b, q, self.lo, self.hi, self.out)


@dataclasses.dataclass
class Dequantize:
    q: str
    out: str
    scale: float
    zp: int

    def run(self, env):
        env[self.out] = (env[self.q] - self.zp) * _f32(self.scale)

    def emit(self, b: Builder):
        b.node("DequantizeLinear", [self.q, b.const(np.float32(self.scale), "s"), b.const(np.uint8(self.zp), "zp")], self.out)


@dataclasses.dataclass
class ClipCodes:
    q: str
    out: str
    lo: int
    hi: int

    def run(self, env):
        env[self.out] = torch.clamp(env[self.q], self.lo, self.hi)

    def emit(self, b: Builder):
        _clip_codes(b, self.q, self.lo, self.hi, self.out)


def _pair(v, n=2):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


@dataclasses.dataclass
class QConv:
    x: str
    out: str
    x_scale: float
    x_zp: int
    weight: torch.Tensor  # int8 values (as int64), [C_out, C_in / groups, kh, kw]
    w_scale: torch.Tensor  # float32 [C_out]
    bias: torch.Tensor  # int32 values (as int64) [C_out]
    y_scale: float
    y_zp: int
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    lo: int = 0
    hi: int = 255

    def multiplier(self) -> torch.Tensor:
        return (_f32(self.x_scale) * self.w_scale.float()) / _f32(self.y_scale)

    def accumulate(self, x: torch.Tensor) -> torch.Tensor:
        """The exact int32 accumulator conv(q_x - zp_x, w) + bias, as float64.

        float32 convolutions are exact while every partial sum stays below 2^24; splitting the
        input as 16 * hi + lo (hi in [-16, 15], lo in [0, 15]) keeps two float32 convs (fast
        oneDNN kernels) under that bound when 16 * max_c sum|w_c| < 2^24; else float64 (exact below 2^53).
        """
        args = (self.stride, self.padding, self.dilation, self.groups)
        w = self.weight.float()
        l1 = float(w.abs().reshape(w.shape[0], -1).sum(dim=1).max())
        if 16 * l1 < 2**24:
            hi = torch.floor(x / 16)
            acc = F.conv2d(hi, w, None, *args).double() * 16 + F.conv2d(x - 16 * hi, w, None, *args).double()
        else:
            acc = F.conv2d(x.double(), self.weight.double(), None, *args)
        return acc + self.bias.double().view(1, -1, 1, 1)

    def run(self, env):
        acc = self.accumulate(env[self.x] - self.x_zp)
        y = torch.round(acc.float() * self.multiplier().view(1, -1, 1, 1)) + self.y_zp
        env[self.out] = torch.clamp(y, max(self.lo, 0), min(self.hi, 255))

    def emit(self, b: Builder):
        full = (self.lo, self.hi) == (0, 255)
        ph, pw = self.padding
        inputs = [
            self.x, b.const(np.float32(self.x_scale), "s"), b.const(np.uint8(self.x_zp), "zp"),
            b.const(self.weight.numpy().astype(np.int8), "w"), b.const(self.w_scale.numpy().astype(np.float32), "ws"),
            b.const(np.zeros(self.weight.shape[0], np.int8), "wzp"),
            b.const(np.float32(self.y_scale), "s"), b.const(np.uint8(self.y_zp), "zp"), b.const(self.bias.numpy().astype(np.int32), "b"),
        ]
        y = b.node(
            "QLinearConv", inputs, self.out if full else None, strides=list(self.stride), pads=[ph, pw, ph, pw],
            dilations=list(self.dilation), group=self.groups, kernel_shape=list(self.weight.shape[2:]),
        )
        if not full:
            _clip_codes(b, y, self.lo, self.hi, self.out)


@dataclasses.dataclass
class ConvIntFloat(QConv):
    """ConvInteger (uint8 weights v + 128, zero point 128: u8 x u8, no int16 saturation on any
    CPU), then Cast, Mul(s_x * s_w[c]), Add(bias): a float output with no new rounding grid."""

    real_bias: torch.Tensor | None = None  # float32 [C_out]

    def run(self, env):
        acc = self.accumulate(env[self.x] - self.x_zp) - self.bias.double().view(1, -1, 1, 1)
        y = acc.float() * self.rescale().view(1, -1, 1, 1)
        env[self.out] = y + self.real_bias.float().view(1, -1, 1, 1)

    def rescale(self) -> torch.Tensor:
        return _f32(self.x_scale) * self.w_scale.float()

    def emit(self, b: Builder):
        ph, pw = self.padding
        w = b.const((self.weight + 128).numpy().astype(np.uint8), "w")
        acc = b.node("ConvInteger", [self.x, w, b.const(np.uint8(self.x_zp), "zp"), b.const(np.uint8(128), "wzp")],
                     strides=list(self.stride), pads=[ph, pw, ph, pw], dilations=list(self.dilation), group=self.groups,
                     kernel_shape=list(self.weight.shape[2:]))
        y = b.node("Mul", [b.node("Cast", [acc], to=1), b.const(self.rescale().numpy().reshape(-1, 1, 1), "rs")])
        b.node("Add", [y, b.const(self.real_bias.float().numpy().reshape(-1, 1, 1), "bias")], self.out)


@dataclasses.dataclass
class QLinearFloat:
    x: str
    out: str
    x_scale: float
    x_zp: int
    weight: torch.Tensor  # int8 values (as int64), [N, K]
    w_scale: torch.Tensor  # float32 [N]
    bias: torch.Tensor | None  # float32 [N]

    def rescale(self) -> torch.Tensor:
        return _f32(self.x_scale) * self.w_scale.float()

    def run(self, env):
        acc = torch.matmul((env[self.x] - self.x_zp).double(), self.weight.double().t())
        y = acc.float() * self.rescale()
        env[self.out] = y if self.bias is None else y + self.bias.float()

    def emit(self, b: Builder):
        zp = b.const(np.uint8(self.x_zp), "zp")
        w = b.const(self.weight.t().contiguous().numpy().astype(np.int8), "w")
        acc = b.node("MatMulInteger", [self.x, w, zp, b.const(np.int8(0), "wzp")])
        y = b.node("Cast", [acc], to=1)
        last = self.bias is None
        y = b.node("Mul", [y, b.const(self.rescale().numpy(), "rs")], self.out if last else None)
        if not last:
            b.node("Add", [y, b.const(self.bias.float().numpy(), "bias")], self.out)


class Int8Reference(torch.nn.Module):
    """The PyTorch reference of a fast-int8 file: runs its ops in order (eval only, no autograd)."""

    def __init__(self, ops, inputs: list[str], outputs: list[str]):
        super().__init__()
        self.ops, self.input_names, self.output_names = list(ops), list(inputs), list(outputs)

    @torch.no_grad()
    def forward(self, *inputs):
        env = dict(zip(self.input_names, (x.float() for x in inputs)))
        for op in self.ops:
            op.run(env)
        outs = [env[name] for name in self.output_names]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            key = getattr(op, "kind", None) or type(op).__name__
            counts[key] = counts.get(key, 0) + 1
        return counts
