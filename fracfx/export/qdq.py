"""ONNX-level half of the export: lower fracfx marker nodes to QuantizeLinear / DequantizeLinear.

The float graph exported by torch carries one node of the private domain "fracfx" per frozen
quantizer, with the quantizer's key (its submodule path) as attribute `key`:

    fracfx::Act(x)      -> QuantizeLinear(x, s, zp) [-> Clip(qmin, qmax) when bits < 8] -> DequantizeLinear
    fracfx::Weight(W)   -> DequantizeLinear(codes, s[C], zp[C], axis)       (W, the float copy, is dropped)

A `centered` quantizer (integer arithmetic, fracfx.passes.integer_arithmetic) dequantizes with
scale 1 to the exact integers q - zp; its real scale stays on the QuantizeLinear (activations) and
in the Mul after the op. Activations use a uint8 carrier (zero point in 0..2^b-1, the Clip keeps b-bit codes); weights are
stored as uint8 codes (format "int8") or packed uint4 (format "int4", opset 21). Unsigned codes
with per-channel zero points are the training quantizer's asymmetric grid as it is; they also keep
onnxruntime on its u8u8 integer kernels if it fuses a Conv into QLinearConv, which widen to 16 bits
before multiplying and so cannot saturate (the u8s8 AVX2 kernel, vpmaddubsw, can: DESIGN.md).
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fracfx.nn.frozen import FrozenActQuant, FrozenWeight
from fracfx.passes.insert_markers import ACT_OP, DOMAIN, WEIGHT_OP  # noqa: F401  (the markers this lowers)

METADATA_KEY = "fracfx.quantizers"
_CODE_DTYPES = {"int8": (np.uint8, 8), "int4": (ml_dtypes.uint4, 4)}


def _const(name: str, array) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


class _UnitScales:
    """Shared all-ones scale initializers (one per length) for centered DequantizeLinear nodes."""

    def __init__(self):
        self.made: dict[int, TensorProto] = {}

    def __call__(self, length: int | None) -> str:
        key = -1 if length is None else length
        if key not in self.made:
            value = np.float32(1.0) if length is None else np.ones(length, np.float32)
            self.made[key] = _const("fracfx.unit_scale" + ("" if length is None else f".{length}"), value)
        return self.made[key].name


def _lower_act(key: str, module: FrozenActQuant, x: str, y: str, units: _UnitScales):
    scale, zp = f"{key}.scale", f"{key}.zero_point"
    inits = [_const(scale, np.float32(module.scale.item())), _const(zp, np.uint8(int(module.zero_point)))]
    dq_scale = units(None) if module.centered else scale
    nodes = [helper.make_node("QuantizeLinear", [x, scale, zp], [f"{key}.q"], name=f"{key}/QuantizeLinear")]
    codes = f"{key}.q"
    if module.bits < 8:
        lo, hi = f"{key}.qmin", f"{key}.qmax"
        inits += [_const(lo, np.uint8(0)), _const(hi, np.uint8(module.qmax))]
        nodes.append(helper.make_node("Clip", [codes, lo, hi], [f"{key}.clip"], name=f"{key}/Clip"))
        codes = f"{key}.clip"
    nodes.append(helper.make_node("DequantizeLinear", [codes, dq_scale, zp], [y], name=f"{key}/DequantizeLinear"))
    return nodes, inits


def _lower_weight(key: str, module: FrozenWeight, y: str, fmt: str, units: _UnitScales):
    dtype, _ = _CODE_DTYPES[fmt]
    codes, scale, zp = f"{key}.codes", f"{key}.scale", f"{key}.zero_point"
    inits = [_const(codes, module.codes.numpy().astype(dtype)), _const(zp, module.zero_point.numpy().astype(dtype))]
    if module.centered:
        scale = units(module.scale.numel())
    else:
        inits.append(_const(scale, module.scale.numpy().astype(np.float32)))
    node = helper.make_node("DequantizeLinear", [codes, scale, zp], [y], name=f"{key}/DequantizeLinear", axis=module.axis)
    return [node], inits


def _record(key: str, role: str, module) -> dict:
    scale, zp = module.scale.reshape(-1), module.zero_point.reshape(-1)
    return {
        "key": key, "role": role, "bits": module.bits, "centered": module.centered, "channels": int(scale.numel()),
        "scale_min": float(scale.min()), "scale_max": float(scale.max()),
        "zero_point_min": int(zp.min()), "zero_point_max": int(zp.max()),
    }


def _key(node: onnx.NodeProto) -> str:
    for attr in node.attribute:
        if attr.name == "key":
            return attr.s.decode()
    raise ValueError(f"marker node {node.name} has no key attribute")


def lower_markers(model: onnx.ModelProto, quantizers: dict[str, object], *, fmt: str) -> onnx.ModelProto:
    """Return a copy of `model` with every fracfx marker lowered to QDQ (module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    new_nodes, records, units = [], [], _UnitScales()
    for node in graph.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        key = _key(node)
        module = quantizers[key]
        if node.op_type == ACT_OP:
            nodes, inits = _lower_act(key, module, node.input[0], node.output[0], units)
        else:
            nodes, inits = _lower_weight(key, module, node.output[0], fmt, units)
        new_nodes += nodes
        graph.initializer.extend(inits)
        records.append(_record(key, node.op_type.lower(), module))
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(units.made.values())
    _drop_domain(out, DOMAIN)
    prune(out)
    _short_node_names(graph)
    # compact JSON: the metadata is read by fracfx (describe_onnx), not by people
    helper.set_model_props(out, {METADATA_KEY: json.dumps(records, separators=(",", ":")), "fracfx.format": fmt})
    return out


def _short_node_names(graph: onnx.GraphProto) -> None:
    """Name nodes `<op>_<index>`: unique, and far shorter than torch's module paths.

    The module path stays in every value name (/layer1/layer1.0/conv1/Conv_output_0), so errors
    and viewers still point at the layer. On a small network the node names are a visible share
    of the file: cifar_resnet38's were 9.4 kB of a 405 kB int4 file.
    """
    for index, node in enumerate(graph.node):
        node.name = f"{node.op_type}_{index}"


def strip_markers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with the markers removed: the plain FP32 network (for latency baselines)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rename = {}
    kept = []
    for node in out.graph.node:
        if node.domain == DOMAIN:
            rename[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    for node in kept:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    for output in out.graph.output:
        if output.name in rename:
            raise ValueError(f"graph output {output.name} is a quantizer output; cannot strip it")
    del out.graph.node[:]
    out.graph.node.extend(kept)
    _drop_domain(out, DOMAIN)
    prune(out)
    return out


def prune(model: onnx.ModelProto) -> None:
    """In place: bypass Identity nodes on initializers, drop unused nodes and initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    inits = {t.name for t in graph.initializer}
    alias = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    used = set(outputs)
    kept = []
    for node in reversed(graph.node):
        if any(o in used for o in node.output):
            kept.append(node)
            used.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)


def _drop_domain(model: onnx.ModelProto, domain: str) -> None:
    keep = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)

