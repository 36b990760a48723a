"""Reading a fast int8 file back (`fracfx inspect model.onnx`): its integer kernels, bits and sizes.

A fast file has no quantizer nodes to list (describe_onnx reads those of the QDQ formats): its
precision lives in the integer kernels. Each QLinearConv / ConvInteger / MatMulInteger becomes a
KernelRow, read from the graph itself, so any file that fast_int8 wrote can be described:

    input bits   the uint8 codes the kernel reads: the Clip range of the QuantizeLinear, QLinearConv
                 or code-preserving op (MaxPool, Flatten) that produced them, else the full 0..255
    weight bits  the levels a channel uses, log2 of (max - min) / g + 1, g the power of two common to
                 its integers (bn_folding.finer_bias_unit scales 4-bit weights up by one), and the
                 largest |integer weight| (int8-fast keeps <= 64 with 8-bit inputs: bn_folding)
    output       the codes QLinearConv writes (scale, zero point, the Clip range's bits), or float
                 (ConvInteger and MatMulInteger are rescaled in float after the kernel)

The file's metadata adds the format, the op counts and (files written since it was recorded)
the lowering statistics: BatchNorms folded, new 8-bit requantization points, re-quantized channels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from fracfx.errors import ExportError

KERNELS = ("QLinearConv", "ConvInteger", "MatMulInteger")
CODE_PRESERVING = ("MaxPool", "Flatten", "Identity", "Reshape")  # ops that pass uint8 codes through unchanged


@dataclasses.dataclass(frozen=True)
class KernelRow:
    """One integer kernel of a fast file."""

    name: str  # the value it writes (named after the fx node, e.g. layer1_0_bn2)
    op: str
    shape: str  # weight shape: C_out x C_in/g x kh x kw (conv) or K x N (matmul)
    input_bits: int
    weight_bits: int  # log2 of the levels the widest channel spans (module docstring)
    weight_max: int  # largest |integer weight| as stored
    channels: int
    weight_scale_min: float | None  # None where the scale sits in a float Mul after the kernel
    weight_scale_max: float | None
    output: str  # "b-bit codes, scale s, zp z" or "float"
    weight_bytes: int


@dataclasses.dataclass(frozen=True)
class FastFile:
    path: str
    format: str
    opset: int
    file_bytes: int
    kernels: tuple[KernelRow, ...]
    ops: dict  # op type -> count in the graph
    initializer_bytes: dict  # dtype -> bytes
    lowering: dict | None  # int8_lower.LoweringStats as recorded at export, when present


def is_fast_file(model) -> bool:
    props = {p.key: p.value for p in model.metadata_props}
    return props.get("fracfx.format", "").startswith("int8-fast")


def _bits(levels: int) -> int:
    return max(1, math.ceil(math.log2(max(levels, 2))))


def _weight_bits(w: np.ndarray) -> int:
    """Bits of the widest channel's grid: (max - min) / g + 1 levels, g its common power of two (rows = channels)."""
    rows = w.reshape(w.shape[0], -1)
    common = np.bitwise_or.reduce(np.abs(rows), axis=1)
    step = np.where(common > 0, common & -common, 1)  # lowest set bit: the power of two dividing every weight
    return _bits(int(((rows.max(axis=1) - rows.min(axis=1)) // step).max()) + 1)


def describe_fast(path: str | os.PathLike) -> FastFile:
    """The integer kernels, op counts and sizes of a file written by fracfx in an int8-fast format."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(os.fspath(path))
    props = {p.key: p.value for p in model.metadata_props}
    if not is_fast_file(model):
        raise ExportError(f"{os.fspath(path)} is not an int8-fast file (fracfx.format is {props.get('fracfx.format', 'missing')!r})")
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def code_range(name: str) -> tuple[int, int]:
        node = producer.get(name)
        while node is not None and node.op_type in CODE_PRESERVING:
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Clip" and len(node.input) == 3 and all(i in inits for i in node.input[1:]):
            return int(inits[node.input[1]]), int(inits[node.input[2]])
        return 0, 255

    def value_name(node) -> str:
        """The value a kernel produces: its own output, or that of the float rescale after it (Cast, Mul, Add)."""
        name = node.output[0]
        while node.op_type != "QLinearConv" and len(consumers.get(name, [])) == 1:
            after = consumers[name][0]
            rescale = after.op_type == "Cast" or (after.op_type in ("Mul", "Add") and any(i in inits for i in after.input))
            if not rescale:  # the residual Add of two values is the next op, not part of this kernel
                break
            node, name = after, after.output[0]
        return name

    rows = []
    for node in graph.node:
        if node.op_type not in KERNELS:
            continue
        weight_name = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
        w = inits[weight_name].astype(np.int64)
        if node.op_type == "ConvInteger":
            w = w - int(inits[node.input[3]])  # uint8 weights around their zero point 128
        if node.op_type == "MatMulInteger":
            w = w.T  # [K, N] -> one row per output channel
        channels = w.shape[0]
        w_max = int(np.abs(w).max()) if w.size else 0
        scales = inits[node.input[4]].reshape(-1) if node.op_type == "QLinearConv" else None
        lo, hi = code_range(node.input[0])
        output = "float"
        if node.op_type == "QLinearConv":
            after = consumers.get(node.output[0], [])
            clip = after[0] if len(after) == 1 and after[0].op_type == "Clip" and all(i in inits for i in after[0].input[1:]) else None
            out_lo, out_hi = (int(inits[clip.input[1]]), int(inits[clip.input[2]])) if clip else (0, 255)
            output = f"{_bits(out_hi + 1)}-bit codes, scale {float(inits[node.input[6]]):.3g}, zp {int(inits[node.input[7]])}"
        rows.append(KernelRow(
            name=value_name(node), op=node.op_type, shape="x".join(map(str, w.shape)), input_bits=_bits(hi - lo + 1),
            weight_bits=_weight_bits(w) if w.size else 0, weight_max=w_max, channels=int(channels),
            weight_scale_min=None if scales is None else float(scales.min()), weight_scale_max=None if scales is None else float(scales.max()),
            output=output, weight_bytes=int(inits[weight_name].nbytes),
        ))
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    sizes: dict[str, int] = {}
    for array in inits.values():
        sizes[str(array.dtype)] = sizes.get(str(array.dtype), 0) + int(array.nbytes)
    lowering = json.loads(props["fracfx.lowering"]) if "fracfx.lowering" in props else None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return FastFile(os.fspath(path), props["fracfx.format"], opset, os.path.getsize(os.fspath(path)), tuple(rows),
                    dict(sorted(ops.items())), dict(sorted(sizes.items())), lowering)
