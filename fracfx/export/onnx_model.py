"""A frozen GraphModule -> onnx.ModelProto whose QDQ nodes fracfx writes itself.

1. the graph pass insert_markers (through the pass runner): each FrozenActQuant / FrozenWeight
   call becomes a marker module that exports as one node of the private domain "fracfx" keyed by
   the quantizer's submodule path; nothing of torch's fake-quant symbolics is used.
2. torch.onnx.export(dynamo=False): the float graph. BN, residual adds, pooling and FP32 layers
   export as they are; training=PRESERVE keeps BN unfolded (the frozen reference runs it
   unfolded); the batch axis of every input and output is dynamic. The TorchScript exporter is
   deterministic, takes custom symbolics directly and stops at opset 20, so opset 21 (int4) is
   reached with onnx.version_converter before the markers are lowered.
3. fracfx.export.qdq.lower_markers: markers -> QuantizeLinear/Clip/DequantizeLinear and integer weights.

Formats: "int8" (opset >= 13, default 17): uint8 codes for activations and weights, b <= 8.
"int4" (opset >= 21, default 21): weights packed as uint4 (b <= 4), activations as in "int8".
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Sequence

import onnx
import torch
import torch.fx as fx
from onnx import version_converter
from torch import nn

from fracfx.errors import ExportError
from fracfx.export.flat_io import input_names, positional
from fracfx.export.flat_io import output_names as flat_output_names
from fracfx.export.qdq import DOMAIN, lower_markers, strip_markers
from fracfx.meta import is_frozen
from fracfx.nn.frozen import FrozenActQuant, FrozenWeight
from fracfx.passes.infra import frozen_quantizers, run_pipeline, step
from fracfx.passes.insert_markers import insert_markers

FORMATS = {"int8": {"min_opset": 13, "opset": 17, "weight_bits": 8}, "int4": {"min_opset": 21, "opset": 21, "weight_bits": 4}}
ACT_MAX_BITS = 8
TORCH_MAX_OPSET = 20
MAX_OPSET = 23


def resolve_opset(fmt: str, opset: int | None) -> int:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose 'int8' (any bits <= 8) or 'int4' (weights <= 4 bits)")
    spec = FORMATS[fmt]
    opset = spec["opset"] if opset is None else int(opset)
    if not spec["min_opset"] <= opset <= MAX_OPSET:
        raise ExportError(f"format {fmt!r} needs an opset in {spec['min_opset']}..{MAX_OPSET}, got {opset}; leave opset=None for {spec['opset']}")
    return opset


def check_format(frozen: fx.GraphModule, fmt: str) -> None:
    """ExportError naming the first quantizers whose bits the format cannot hold."""
    limit_w = FORMATS[fmt]["weight_bits"]
    bad = []
    for node in frozen.graph.nodes:
        module = frozen.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FrozenWeight) and module.bits > limit_w:
            bad.append(f"{node.name} ({node.target}: {module.bits}-bit weights, format {fmt!r} holds <= {limit_w})")
        elif isinstance(module, FrozenActQuant) and module.bits > ACT_MAX_BITS:
            bad.append(f"{node.name} ({node.target}: {module.bits}-bit activations, the uint8 carrier holds <= 8)")
    if bad:
        way_out = "use format='int8' or freeze with bits=(a, 4)" if fmt == "int4" else "freeze with bits <= 8, or keep those layers FP32 (keep_fp32)"
        raise ExportError(f"cannot export in format {fmt!r}: {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; {way_out}")


def marker_view(frozen: fx.GraphModule) -> fx.GraphModule:
    """The frozen graph with ONNX markers for its quantizers (the insert_markers pass, through the runner)."""
    return run_pipeline(frozen, [
        step(insert_markers),
    ])


def torch_export(frozen: fx.GraphModule, example_inputs: Sequence[torch.Tensor], opset: int) -> onnx.ModelProto:
    """torch.onnx.export of the marker view of `frozen` to an in-memory ModelProto, batch axis
    dynamic; a model with keyword inputs or a dataclass output is exported flat, its inputs and
    outputs named after the keywords and fields (fracfx.export.flat_io)."""
    view = marker_view(positional(frozen))
    with torch.no_grad():
        outputs = view(*example_inputs)
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    inputs, output_names = input_names(frozen, len(example_inputs)), flat_output_names(frozen, n_out)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            view, tuple(example_inputs), buffer, dynamo=False, opset_version=min(opset, TORCH_MAX_OPSET),
            input_names=inputs, output_names=output_names, dynamic_axes={n: {0: "batch"} for n in inputs + output_names},
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True, custom_opsets={DOMAIN: 1},
        )
    model = onnx.load_from_string(buffer.getvalue())
    if opset > TORCH_MAX_OPSET:
        model = version_converter.convert_version(model, opset)
    return model


_UNSUPPORTED = re.compile(r"operator '(?:aten::)?([A-Za-z0-9_.:]+)'")


def explain_failure(frozen: fx.GraphModule, error: Exception) -> str:
    """Name the fx nodes behind a torch.onnx failure, and the ways out."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    match = _UNSUPPORTED.search(str(error))
    culprits = []
    if match:
        op = match.group(1).split("::")[-1].split(".")[0]
        for node in frozen.graph.nodes:
            if node.op == "call_module":
                name = type(frozen.get_submodule(node.target)).__name__.lower()
            elif node.op == "call_method":
                name = str(node.target)
            else:
                name = getattr(node.target, "__name__", "")
            if name and name.strip("_") == op.strip("_"):
                culprits.append(node.name)
    where = f" at node(s) {', '.join(culprits[:5])}" if culprits else ""
    return (
        f"torch.onnx could not export the frozen graph{where}: {type(error).__name__}: {text}. "
        "Replace that op with an ONNX-exportable one, register a symbolic for it "
        "(torch.onnx.register_custom_op_symbolic), or keep it out of the exported model"
    )


def export_onnx_model(frozen: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *, fmt: str = "int8", opset: int | None = None) -> onnx.ModelProto:
    """The QDQ ModelProto of a frozen GraphModule (module docstring); `frozen` is not modified."""
    if not is_frozen(frozen):
        raise ExportError("export_onnx_model needs the output of freeze_precision / fracfx.freeze; freeze the model first")
    opset = resolve_opset(fmt, opset)
    check_format(frozen, fmt)
    try:
        model = torch_export(frozen, example_inputs, opset)
    except Exception as error:
        raise ExportError(explain_failure(frozen, error)) from error
    model = lower_markers(model, frozen_quantizers(frozen), fmt=fmt)
    _forget_traced_shapes(model)
    onnx.checker.check_model(model)
    return model


def _forget_traced_shapes(model: onnx.ModelProto) -> None:
    """Drop the intermediate shapes torch.onnx recorded from the example inputs.

    The marker ops carry the traced shape of their output, batch included (e.g. [2, 4, 16, 8]
    for an attention matmul's operand). onnxruntime trusts value_info: it constant-folds Shape
    nodes reading such a value into the example's batch, and a later Reshape then fails at any
    other batch size. Without value_info, onnxruntime infers shapes from the inputs' own
    (dynamic) shapes.
    """
    del model.graph.value_info[:]


def export_float_model(frozen: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *, opset: int = 17) -> onnx.ModelProto:
    """The same network with every quantizer removed (FP32 weights): the latency baseline."""
    model = strip_markers(torch_export(frozen, example_inputs, opset))
    onnx.checker.check_model(model)
    return model
