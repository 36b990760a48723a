"""The fast int8 format: an ONNX file onnxruntime runs on its integer kernels (QLinearConv, MatMulInteger).

    report = fracfx.export_onnx(qm, "m.onnx", x, format="int8-fast", verify=True, verify_inputs=images)
    ref = build_reference(qm, calibration_inputs=images)  # the PyTorch model of the file's arithmetic

"int8-fast" is portable: weights keep int16 headroom for the u8 x s8 kernels of CPUs without VNNI
(fracfx.export.bn_folding); "int8-fast-vnni" uses the full int8 weight range and is for CPUs with
VNNI (AVX512-VNNI, AVX-VNNI) or ARM dot-product instructions, where it is exact as well. The
lowering rules (BatchNorm folding, where new 8-bit requantization points go) are in int8_plan.

The agreement contract (fast_report.verify_fast, at ORT_DISABLE_ALL and ORT_ENABLE_ALL) against the
reference: per-element error within one output step for >= 99.9 % of elements, and top-1 agreement
>= 99.9 %. The output step is the output quantizer's when the output is codes, else that of an
8-bit grid over the reference outputs' range ((max - min) / 255).
"""

from __future__ import annotations

import os

import torch
import torch.fx as fx

from fracfx.errors import ExportError
from fracfx.meta import FROZEN
from fracfx.export.fast_report import NOISE, FastExportReport, verify_fast
from fracfx.export.int8_ops import Builder, Int8Reference

# format -> (full int8 weight range: VNNI CPUs only, float branches: ConvInteger where the trained model keeps a float)
FAST_FORMATS = {"int8-fast": (False, False), "int8-fast-vnni": (True, False), "int8-fast-faithful": (False, True)}
OPSET = 17
BN_SIGMAS = 6.0  # data-free range of a new grid after a BatchNorm: beta +- BN_SIGMAS * |gamma|


def _tuple(inputs):
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _frozen_dequantized(gm: fx.GraphModule) -> fx.GraphModule:
    from fracfx.export.pipeline import freeze
    from fracfx.nn.frozen import FrozenActQuant, FrozenWeight
    from fracfx.passes.freeze_precision import is_frozen

    frozen = gm if is_frozen(gm) else freeze(gm, arithmetic="dequantized")
    if any(getattr(m, "centered", False) for m in frozen.modules() if isinstance(m, (FrozenActQuant, FrozenWeight))):
        raise ExportError(
            "format 'int8-fast' lowers the dequantized frozen form; pass the transformed model or "
            "fracfx.freeze(qm, arithmetic='dequantized'), not the integer-arithmetic freeze"
        )
    return frozen


@torch.no_grad()
def measure_ranges(frozen: fx.GraphModule, names: list[str], inputs, *, batch_size: int = 64) -> dict[str, tuple[float, float]]:
    """Mean over batches of each named node's (min, max) in the frozen model (like calibrate)."""
    if not names:
        return {}
    wanted, sums, count = set(names), {n: [0.0, 0.0] for n in names}, 0

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.name in wanted:
                sums[node.name][0] += float(out.min())
                sums[node.name][1] += float(out.max())
            return out

    inputs = _tuple(inputs)
    frozen.eval()
    for start in range(0, inputs[0].shape[0], batch_size):
        Recorder(frozen).run(*(t[start:start + batch_size] for t in inputs))
        count += 1
    return {n: (lo / count, hi / count) for n, (lo, hi) in sums.items()}


def _requantized_layers(frozen: fx.GraphModule, vnni: bool) -> list[str]:
    """Quantized convs/linears with weight codes beyond the smallest limit the format may impose (bn_folding)."""
    from fracfx.export import bn_folding
    from fracfx.export.int8_plan import _module, _quantized_conv, _quantized_linear

    floor = bn_folding.headroom_limit(255, vnni=vnni)  # 8-bit activations: the tightest limit
    return [node.name for node in frozen.graph.nodes
            if (_quantized_conv(frozen, node) or _quantized_linear(frozen, node))
            and int(bn_folding.centered_codes(_module(frozen, node.args[1])).abs().max()) > floor]


def build_reference(gm: fx.GraphModule, calibration_inputs=None, *, vnni: bool = False, example_inputs=None, float_branches: bool = False):
    """(Int8Reference, LoweringStats, frozen model) for a transformed or frozen-dequantized model.

    The ranges of new 8-bit grids come from `calibration_inputs` (a batch, or a tuple of them)
    when given; else from the BatchNorm before them (int8_plan.batchnorm_ranges: data-free, the
    training data's statistics) and, for a grid with no BatchNorm before it, from seeded N(0, 1)
    samples shaped like `example_inputs`; each is then cut to the interval where the branch can
    change the output at all (int8_ranges.narrow: lossless). With `calibration_inputs` (images like the training
    data, a few hundred), weight channels re-quantized for the format's limit are also rounded to
    minimise the conv's output error on them, their bias corrected for the mean shift
    (fracfx.export.weight_rounding); without, to nearest.
    """
    from fracfx.export.int8_lower import lower
    from fracfx.export.int8_plan import batchnorm_ranges, new_points
    from fracfx.export.int8_ranges import narrow

    frozen = _frozen_dequantized(gm)
    points = new_points(frozen)
    if calibration_inputs is not None:
        ranges = measure_ranges(frozen, points, calibration_inputs)
    else:
        from fracfx.export.pipeline import random_inputs

        ranges = batchnorm_ranges(frozen, points, sigmas=BN_SIGMAS)
        rest = [p for p in points if p not in ranges]
        if rest:
            if example_inputs is None:
                raise ExportError(f"new 8-bit grids at {rest[:3]} have no BatchNorm before them; pass calibration_inputs")
            ranges.update(measure_ranges(frozen, rest, random_inputs(gm, _tuple(example_inputs), 256, seed=3)))
    ranges = narrow(frozen, ranges)  # a residual branch's grid covers only where it can change the output (int8_ranges)
    moments = None
    if calibration_inputs is not None:
        from fracfx.export.weight_rounding import input_moments

        moments = input_moments(frozen, _requantized_layers(frozen, vnni), _tuple(calibration_inputs))
    ops, inputs, outputs, stats = lower(frozen, ranges, vnni=vnni, float_branches=float_branches, moments=moments)
    return Int8Reference(ops, inputs, outputs), stats, frozen


def to_onnx(reference: Int8Reference, example_inputs, *, fmt: str = "int8-fast", stats=None):
    """The ModelProto of a reference: inputs and outputs with a dynamic batch axis.

    Metadata: the format, the op counts and (given `stats`, int8_lower.LoweringStats) the lowering
    statistics, which `fracfx inspect` shows (fracfx.export.fast_describe).
    """
    import dataclasses
    import json

    import onnx
    from onnx import TensorProto, helper

    example_inputs = _tuple(example_inputs)
    outputs = _tuple(reference(*example_inputs))
    b = Builder()
    for op in reference.ops:
        op.emit(b)

    def info(name, t):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch"] + list(t.shape[1:]))

    graph = helper.make_graph(
        b.nodes, "fracfx_int8_fast", [info(n, t) for n, t in zip(reference.input_names, example_inputs)],
        [info(n, t) for n, t in zip(reference.output_names, outputs)], b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fracfx")
    props = {"fracfx.format": fmt, "fracfx.ops": json.dumps(reference.op_counts(), separators=(",", ":"))}
    if stats is not None:
        props["fracfx.lowering"] = json.dumps(dataclasses.asdict(stats), separators=(",", ":"))
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model


class _FloatWeight(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self):
        return self.weight


def float_twin(frozen: fx.GraphModule, example_inputs, *, opset: int = OPSET):
    """The same network with every quantizer removed (dequantized FP32 weights): the latency baseline."""
    import copy
    import io
    import warnings

    import onnx

    from fracfx.nn.frozen import FrozenActQuant, FrozenWeight

    twin = copy.deepcopy(frozen)
    for node in list(twin.graph.nodes):
        module = twin.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FrozenActQuant):
            node.replace_all_uses_with(node.args[0])
            twin.graph.erase_node(node)
        elif isinstance(module, FrozenWeight):
            owner, _, name = node.target.rpartition(".")
            setattr(twin.get_submodule(owner) if owner else twin, name, _FloatWeight(module().detach()))
    twin.recompile()
    example_inputs = _tuple(example_inputs)
    names = [f"input_{i}" for i in range(len(example_inputs))]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(twin.eval(), example_inputs, buffer, dynamo=False, opset_version=opset, input_names=names,
                          output_names=["output"], dynamic_axes={n: {0: "batch"} for n in names + ["output"]})
    return onnx.load_from_string(buffer.getvalue())


def export_fast(gm, path, example_inputs, *, format: str = "int8-fast", calibration_inputs=None, verify: bool = False,
                verify_inputs=None, verify_label: str | None = None, latency: bool = False) -> FastExportReport:
    """Write `gm` in a fast int8 format; no file is written when lowering fails (ExportError).

    verify_inputs default to 64 seeded N(0, 1) samples; verify_label says what given ones are
    ("test images"), for the report's lines.
    """
    from fracfx.export.pipeline import random_inputs

    if format not in FAST_FORMATS:
        raise ExportError(f"unknown fast format {format!r}; choose one of {sorted(FAST_FORMATS)}")
    example_inputs = _tuple(example_inputs)
    vnni, float_branches = FAST_FORMATS[format]
    reference, stats, frozen = build_reference(gm, calibration_inputs, vnni=vnni, example_inputs=example_inputs, float_branches=float_branches)
    model = to_onnx(reference, example_inputs, fmt=format, stats=stats)
    path = os.fspath(path)
    with open(path, "wb") as handle:
        handle.write(model.SerializeToString())
    check = timing = None
    if verify:
        inputs = _tuple(verify_inputs) if verify_inputs is not None else random_inputs(gm, example_inputs, 64)
        label = NOISE if verify_inputs is None else (verify_label or "given inputs")
        check = verify_fast(model, reference, inputs, frozen=frozen, inputs_label=label)
    if latency:
        from fracfx.export.verify import compare_latency

        timing = compare_latency(path, float_twin(frozen, example_inputs), example_inputs)
    report = FastExportReport(path, format, OPSET, os.path.getsize(path), stats, check, timing, frozen.meta.get(FROZEN, ()))
    object.__setattr__(report, "reference", reference)  # the file's Int8Reference; not a field (asdict / JSON skip it)
    return report
