"""Lower a frozen (dequantized) GraphModule to fast-int8 ops; the rules are in int8_plan."""

from __future__ import annotations

import dataclasses

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fracfx.export import bn_folding
import torch

from fracfx.export.int8_float import Float
from fracfx.export.int8_ops import ClipCodes, ConvIntFloat, Dequantize, QConv, QLinearFloat, Quantize
from fracfx.export.int8_plan import (
    _ADD, _FLATTEN, _IDENTITY_MODULES, Codes, Val, _arg, _attr, _clamp_bounds, _module, _quantized_conv, _quantized_linear, conv_chain,
    quantize_value, target_grid, unsupported,
)
from fracfx.nn.frozen import FrozenActQuant, FrozenWeight


@dataclasses.dataclass
class LoweringStats:
    qconv: int = 0
    conv_integer: int = 0  # ConvInteger + float rescale (float_branches)
    qlinear: int = 0
    folded_bn: int = 0
    new_grids: int = 0  # requantization points the trained model does not have
    requantized_channels: int = 0  # weight channels re-quantized for int16 headroom
    float_ops: int = 0


class Lowering:
    def __init__(self, gm: fx.GraphModule, ranges: dict, *, vnni: bool, float_branches: bool = False, moments: dict | None = None):
        self.gm, self.ranges, self.vnni, self.float_branches = gm, ranges, vnni, float_branches
        self.moments = moments or {}  # node name -> weight_rounding.InputMoments, for re-quantized channels
        self.ops, self.env, self.done = [], {}, set()
        self.stats = LoweringStats()
        self._dq_cache: dict[str, str] = {}

    # -- values ---------------------------------------------------------------------------
    def float_of(self, node) -> str:
        val = self.env[node.name]
        if val.codes is None:
            return val.name
        if val.name not in self._dq_cache:
            out = f"{val.name}_dq"
            self.ops.append(Dequantize(val.name, out, val.codes.scale, val.codes.zp))
            self._dq_cache[val.name] = out
        return self._dq_cache[val.name]

    def put(self, node, name: str, codes: Codes | None = None):
        self.env[node.name] = Val(name, codes)

    def float_op(self, node, kind, inputs, **params):
        self.ops.append(Float(kind, inputs, node.name, params))
        self.put(node, node.name)
        self.stats.float_ops += 1

    # -- the walk -------------------------------------------------------------------------
    def run(self) -> tuple[list, list[str], list[str]]:
        inputs, outputs = [], []
        for node in self.gm.graph.nodes:
            if node.name in self.done:
                continue
            if node.op == "placeholder":
                self.put(node, node.name)
                inputs.append(node.name)
            elif node.op == "output":
                many = isinstance(node.args[0], (tuple, list))
                for i, out in enumerate(node.args[0] if many else [node.args[0]]):
                    name = f"output_{i}" if many else "output"
                    self.ops.append(Float("identity", [self.float_of(out)], name))
                    outputs.append(name)
            elif node.op == "get_attr":
                continue
            else:
                self.lower(node)
        return self.ops, inputs, outputs

    def lower(self, node: fx.Node) -> None:
        gm, m = self.gm, _module(self.gm, node)
        if isinstance(m, FrozenWeight):
            if not all(_quantized_conv(gm, u) or _quantized_linear(gm, u) for u in node.users):
                raise unsupported(gm, next(iter(node.users)), "its weight is quantized but its input is not an activation quantizer's output")
            return
        if isinstance(m, FrozenActQuant):
            return self.act_quant(node, m)
        if _quantized_conv(gm, node):
            return self.qconv(node)
        if _quantized_linear(gm, node):
            return self.qlinear(node)
        clamp = _clamp_bounds(gm, node)
        if clamp is not None:
            return self.clamp(node, clamp)
        if isinstance(m, _IDENTITY_MODULES):
            return self.put(node, self.env[node.args[0].name].name, self.env[node.args[0].name].codes)
        if isinstance(m, nn.MaxPool2d) or (node.op == "call_function" and node.target is F.max_pool2d):
            return self.maxpool(node, m)
        if node.op == "call_function" and node.target in _ADD and all(isinstance(a, fx.Node) for a in node.args[:2]):
            return self.float_op(node, "add", [self.float_of(a) for a in node.args[:2]])
        if self._is_global_pool(node, m):
            return self.float_op(node, "gap", [self.float_of(node.args[0])])
        if (node.op == "call_function" and node.target in _FLATTEN) or (node.op == "call_method" and node.target == "flatten") or isinstance(m, nn.Flatten):
            return self.flatten(node, m)
        if bn_folding_ok(m):
            a, c = bn_folding.bn_factors(m)
            shape = (-1, 1, 1)
            return self.float_op(node, "affine", [self.float_of(node.args[0])], scale=a.float().view(shape), shift=c.float().view(shape))
        if isinstance(m, nn.Linear):
            return self.float_op(node, "gemm", [self.float_of(node.args[0])], weight=m.weight.detach(), bias=None if m.bias is None else m.bias.detach())
        if isinstance(m, nn.Conv2d) and isinstance(m.padding, tuple) and m.padding_mode == "zeros":
            return self.float_op(node, "conv", [self.float_of(node.args[0])], weight=m.weight.detach(),
                                 bias=None if m.bias is None else m.bias.detach(), stride=m.stride, padding=m.padding,
                                 dilation=m.dilation, groups=m.groups)
        raise unsupported(gm, node)

    # -- rules ----------------------------------------------------------------------------
    def act_quant(self, node, q: FrozenActQuant) -> None:
        src = self.env[node.args[0].name]
        if q.bits > 8:
            raise unsupported(self.gm, node, f"{q.bits}-bit activations do not fit uint8")
        scale, zp = float(q.scale), int(q.zero_point)
        c = src.codes
        if c is not None and c.scale == scale and c.zp == zp:
            lo, hi = max(c.lo, 0), min(c.hi, q.qmax)
            if (lo, hi) == (c.lo, c.hi):
                return self.put(node, src.name, c)
            self.ops.append(ClipCodes(src.name, node.name, lo, hi))
            return self.put(node, node.name, Codes(scale, zp, lo, hi))
        self.ops.append(Quantize(self.float_of(node.args[0]), node.name, scale, zp, 0, q.qmax))
        self.put(node, node.name, Codes(scale, zp, 0, q.qmax))

    def _input_codes(self, node) -> Codes:
        codes = self.env[node.args[0].name].codes
        if codes is None:
            raise unsupported(self.gm, node, "its input quantizer was lowered to float")
        return codes

    def qconv(self, node) -> None:
        gm = self.gm
        x = self._input_codes(node)
        weight = _module(gm, node.args[1])
        bias = _attr(gm, _arg(node, 2, "bias"))
        stride, padding, dilation = (_arg(node, i, n, d) for i, n, d in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))
        groups = int(_arg(node, 6, "groups", 1))
        if isinstance(padding, str) or weight.codes.dim() != 4:
            raise unsupported(gm, node, "string padding or a non-2-D convolution")
        bn, clamps, chain, end = conv_chain(gm, node)
        grid, new = target_grid(gm, end, self.ranges)
        if new and self.float_branches:
            return self.conv_float(node, x, weight, bias, bn, clamps, chain, (stride, padding, dilation, groups))
        lo, hi = 0, 255
        for a, b in clamps:
            lo, hi = max(lo, quantize_value(a, grid)), min(hi, quantize_value(b, grid))
        limit = bn_folding.headroom_limit(x.hi, vnni=self.vnni)
        folded = bn_folding.fold(weight, bias, bn, limit=limit, moments=self.moments.get(node.name))
        folded = bn_folding.finer_bias_unit(folded, limit, x.scale)  # the int32 bias is the only rounding this changes
        bias_q = bn_folding.int32_bias(folded.bias, x.scale, folded.scale)
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))  # noqa: E731
        self.ops.append(QConv(
            self.env[node.args[0].name].name, end.name, x.scale, x.zp, folded.values, folded.scale, bias_q, grid.scale, grid.zp,
            pair(stride), pair(padding), pair(dilation), groups, lo, hi,
        ))
        self.done.update(n.name for n in chain)
        self.put(end, end.name, Codes(grid.scale, grid.zp, lo, hi))
        self.stats.qconv += 1
        self.stats.folded_bn += bn is not None
        self.stats.new_grids += new
        self.stats.requantized_channels += folded.requantized

    def conv_float(self, node, x: Codes, weight, bias, bn, clamps, chain, conv_args) -> None:
        """A conv whose output the trained model keeps in float: ConvInteger + float rescale."""
        stride, padding, dilation, groups = conv_args
        folded = bn_folding.fold(weight, bias, bn, limit=bn_folding.INT8_LIMIT, moments=self.moments.get(node.name))
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))  # noqa: E731
        end = chain[0] if bn is not None else node
        self.ops.append(ConvIntFloat(
            self.env[node.args[0].name].name, end.name, x.scale, x.zp, folded.values, folded.scale, torch.zeros(folded.values.shape[0], dtype=torch.long),
            1.0, 0, pair(stride), pair(padding), pair(dilation), groups, real_bias=folded.bias.float(),
        ))
        self.done.add(end.name)
        self.put(end, end.name)
        self.stats.conv_integer += 1
        self.stats.folded_bn += bn is not None
        self.stats.requantized_channels += folded.requantized

    def qlinear(self, node) -> None:
        x = self._input_codes(node)
        weight = _module(self.gm, node.args[1])
        bias = _attr(self.gm, _arg(node, 2, "bias"))
        limit = bn_folding.headroom_limit(x.hi, vnni=self.vnni)
        folded = bn_folding.fold(weight, bias, None, limit=limit, moments=self.moments.get(node.name))
        self.ops.append(QLinearFloat(
            self.env[node.args[0].name].name, node.name, x.scale, x.zp, folded.values, folded.scale,
            folded.bias.float() if bias is not None or folded.bias.any() else None,  # fold's bias correction may give one
        ))
        self.put(node, node.name)
        self.stats.qlinear += 1
        self.stats.requantized_channels += folded.requantized

    def clamp(self, node, bounds) -> None:
        src = self.env[node.args[0].name]
        if src.codes is None:
            if bounds == (0.0, float("inf")):
                return self.float_op(node, "relu", [src.name])
            return self.float_op(node, "clip", [src.name], min=bounds[0], max=bounds[1])
        c = src.codes
        lo, hi = max(c.lo, quantize_value(bounds[0], c)), min(c.hi, quantize_value(bounds[1], c))
        if (lo, hi) == (c.lo, c.hi):
            return self.put(node, src.name, c)
        self.ops.append(ClipCodes(src.name, node.name, lo, hi))
        self.put(node, node.name, Codes(c.scale, c.zp, lo, hi))

    def maxpool(self, node, m) -> None:
        if m is None:
            raise unsupported(self.gm, node, "functional max_pool2d (use nn.MaxPool2d)")
        if m.return_indices:
            raise unsupported(self.gm, node, "max pooling that returns indices")
        src = self.env[node.args[0].name]
        params = dict(kernel=m.kernel_size, stride=m.stride or m.kernel_size, padding=m.padding, dilation=m.dilation, ceil_mode=m.ceil_mode)
        self.ops.append(Float("maxpool", [src.name], node.name, params))
        self.put(node, node.name, src.codes)

    def _is_global_pool(self, node, m) -> bool:
        if isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size
        elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            size = _arg(node, 1, "output_size")
        else:
            return False
        return size in (1, (1, 1), [1, 1])

    def flatten(self, node, m) -> None:
        start = m.start_dim if m is not None else _arg(node, 1, "start_dim", 0)
        end = m.end_dim if m is not None else _arg(node, 2, "end_dim", -1)
        if end != -1 or start != 1:
            raise unsupported(self.gm, node, "flatten other than flatten(x, 1)")
        src = self.env[node.args[0].name]
        self.ops.append(Float("flatten", [src.name], node.name, {"axis": int(start)}))
        self.put(node, node.name, src.codes)


def bn_folding_ok(m) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_var is not None


def lower(gm: fx.GraphModule, ranges: dict, *, vnni: bool = False, float_branches: bool = False, moments: dict | None = None):
    """(ops, input names, output names, LoweringStats) of a frozen dequantized GraphModule.

    float_branches: a conv whose output the trained model keeps in float (it would need a new
    8-bit grid) becomes ConvInteger + float rescale instead: no rounding the trained model lacks,
    but onnxruntime's ConvInteger (u8 x u8, NCHW im2col, no prepacked weights) is slower.
    moments: {conv/linear node name: weight_rounding.InputMoments} from calibration data, which
    re-quantized weight channels are rounded (and their bias corrected) against; without, they are
    rounded to nearest.
    """
    lowering = Lowering(gm, ranges, vnni=vnni, float_branches=float_branches, moments=moments)
    ops, inputs, outputs = lowering.run()
    return ops, inputs, outputs, lowering.stats
