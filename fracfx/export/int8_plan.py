"""Plan a frozen (dequantized) GraphModule as fast-int8 ops (fracfx.export.int8_ops).

Walks the fx graph once. A quantized conv (its input from a FrozenActQuant, its weight a
FrozenWeight) becomes a QLinearConv; the chain after it (an eval BatchNorm, folded into the
weights, then ReLU / ReLU6 / Hardtanh, which are clamps on the output codes) ends at a value E:

    E's users are activation quantizers with one grid   -> QLinearConv writes that grid's codes:
                                                           no rounding the trained model lacks
    otherwise, a user is an 8-bit activation quantizer  -> that grid (the other users read its codes)
    otherwise                                           -> a new 8-bit grid over E's calibrated
                                                           range (residual branches, pooled stems)

so requantization points are added only where the trained model keeps a float value that an
integer kernel cannot produce. Quantized linears compute MatMulInteger -> float. Everything else
runs in float (add, pooling, FP32 layers), with a DequantizeLinear inserted where it reads codes;
max pooling, ReLU-like clamps and flatten act on codes directly (exact: quantization is monotone).
An op outside this vocabulary raises ExportError naming it, its module path and the format that
exports it.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fracfx.errors import ExportError, FormatError
from fracfx.nn.frozen import FrozenActQuant, FrozenWeight

_ADD = (operator.add, torch.add, operator.iadd)
_RELU = (F.relu, torch.relu)
_FLATTEN = (torch.flatten,)
_IDENTITY_MODULES = (nn.Dropout, nn.Identity)


@dataclasses.dataclass(frozen=True)
class Codes:
    scale: float
    zp: int
    lo: int = 0
    hi: int = 255


@dataclasses.dataclass
class Val:
    name: str
    codes: Codes | None = None  # None: float32


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0] or "<root>"
    return str(node.target) if node.op == "call_module" else "<root>"


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


def unsupported(gm, node, why: str = "") -> ExportError:
    return FormatError(
        f"format 'int8-fast' cannot express {_op_name(gm, node)} (node {node.name}, module {module_path(node)})"
        f"{': ' + why if why else ''}; export this model with format='int8' (exact QDQ, any op torch.onnx exports), "
        "which writes it with the op in float"
    )


def _module(gm, node):
    return gm.get_submodule(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None


def _clamp_bounds(gm, node) -> tuple[float, float] | None:
    """(min, max) of a ReLU-like clamp node, or None."""
    m = _module(gm, node)
    if isinstance(m, nn.ReLU) or (node.op == "call_function" and node.target in _RELU) or (node.op == "call_method" and node.target == "relu"):
        return (0.0, float("inf"))
    if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh
        return (float(m.min_val), float(m.max_val))
    if node.op == "call_function" and node.target in (F.relu6,):
        return (0.0, 6.0)
    if node.op == "call_function" and node.target in (F.hardtanh,):
        args = list(node.args[1:]) + [None, None]
        lo = node.kwargs.get("min_val", args[0] if args[0] is not None else -1.0)
        hi = node.kwargs.get("max_val", args[1] if args[1] is not None else 1.0)
        return (float(lo), float(hi))
    return None


def _is_bn(m) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_var is not None


def conv_chain(gm, conv: fx.Node) -> tuple[nn.Module | None, list[tuple[float, float]], list[fx.Node], fx.Node]:
    """(bn, clamps, chain nodes, end node E) after a conv (module docstring)."""
    bn, clamps, chain, end = None, [], [], conv
    if len(end.users) == 1 and _is_bn(_module(gm, next(iter(end.users)))):
        end = next(iter(end.users))
        bn = _module(gm, end)
        chain.append(end)
    while len(end.users) == 1 and _clamp_bounds(gm, next(iter(end.users))) is not None:
        end = next(iter(end.users))
        clamps.append(_clamp_bounds(gm, end))
        chain.append(end)
    return bn, clamps, chain, end


def _quantizer_users(gm, node) -> list[FrozenActQuant]:
    return [m for m in (_module(gm, u) for u in node.users) if isinstance(m, FrozenActQuant)]


def target_grid(gm, end: fx.Node, ranges: dict) -> tuple[Codes, bool]:
    """(grid written at `end`, whether it is a new grid) (module docstring)."""
    quants = _quantizer_users(gm, end)
    grids = {(float(q.scale), int(q.zero_point), q.qmax) for q in quants}
    if quants and len(quants) == len(end.users) and len(grids) == 1:
        scale, zp, _ = grids.pop()
        return Codes(scale, zp), False
    eight = [q for q in quants if q.bits == 8]
    if eight:
        return Codes(float(eight[0].scale), int(eight[0].zero_point)), False
    lo, hi = ranges[end.name]
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    zp = int(min(255, max(0, round(-lo / scale))))
    return Codes(float(torch.tensor(scale, dtype=torch.float32)), zp), True


def quantize_value(value: float, grid: Codes) -> int:
    if value == float("inf"):
        return 255
    if value == float("-inf"):
        return 0
    q = torch.round(torch.tensor(value, dtype=torch.float32) / torch.tensor(grid.scale, dtype=torch.float32)) + grid.zp
    return int(q.clamp(0, 255))


def new_points(gm: fx.GraphModule) -> list[str]:
    """Names of the nodes that get a new 8-bit grid (the calibration needs their ranges)."""
    found = []
    for node in gm.graph.nodes:
        if _quantized_conv(gm, node):
            end = conv_chain(gm, node)[3]
            quants = _quantizer_users(gm, end)
            grids = {(float(q.scale), int(q.zero_point), q.qmax) for q in quants}
            if not (quants and len(quants) == len(end.users) and len(grids) == 1) and not any(q.bits == 8 for q in quants):
                found.append(end.name)
    return found


def _quantized_conv(gm, node) -> bool:
    if not (node.op == "call_function" and node.target in (torch.conv2d, F.conv2d)):
        return False
    return isinstance(_module(gm, node.args[0]), FrozenActQuant) and isinstance(_module(gm, node.args[1]), FrozenWeight)


def _quantized_linear(gm, node) -> bool:
    return (node.op == "call_function" and node.target is F.linear and isinstance(_module(gm, node.args[0]), FrozenActQuant)
            and isinstance(_module(gm, node.args[1]), FrozenWeight))


def _arg(node, index, name, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _attr(gm, node):
    if node is None:
        return None
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise ExportError(f"bias {node} of a quantized layer is computed in the graph; the fast format needs a parameter")
    owner, _, name = node.target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def batchnorm_ranges(gm: fx.GraphModule, names: list[str], *, sigmas: float) -> dict[str, tuple[float, float]]:
    """Data-free ranges of new grids that follow a BatchNorm: beta +- sigmas * |gamma| per channel.

    An eval BatchNorm's output is gamma * x_hat + beta with x_hat of unit variance on the
    training data (its running statistics), so this range is what calibration on training
    images would find, without the images. Clamps after the BatchNorm narrow it.
    """
    found = {}
    for node in gm.graph.nodes:
        if not _quantized_conv(gm, node):
            continue
        bn, clamps, _, end = conv_chain(gm, node)
        if end.name not in names or bn is None:
            continue
        gamma = bn.weight.detach().abs() if bn.affine else torch.ones_like(bn.running_var)
        beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_var)
        lo, hi = float((beta - sigmas * gamma).min()), float((beta + sigmas * gamma).max())
        for a, b in clamps:
            lo, hi = min(max(lo, a), b), max(min(hi, b), a)
        found[end.name] = (lo, hi)
    return found
