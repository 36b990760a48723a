"""The fast int8 format: an ONNX file onnxruntime runs on its integer kernels (QLinearConv, MatMulInteger).

    report = fracfx.export_onnx(qm, "m.onnx", x, format="int8-fast", verify=True, verify_inputs=images)
    ref = build_reference(qm, calibration_inputs=images)  # the PyTorch model of the file's arithmetic

"int8-fast" is portable: weights keep int16 headroom for the u8 x s8 kernels of CPUs without VNNI
(fracfx.export.bn_folding); "int8-fast-vnni" uses the full int8 weight range and is for CPUs with
VNNI (AVX512-VNNI, AVX-VNNI) or ARM dot-product instructions, where it is exact as well. The
lowering rules (BatchNorm folding, where new 8-bit requantization points go) are in int8_plan.

The agreement contract, checked by verify at ORT_DISABLE_ALL and ORT_ENABLE_ALL against the
reference: per-element error within one output step for >= 99.9 % of elements, and top-1 agreement
>= 99.9 %. The output step is the output quantizer's when the output is codes, else that of an
8-bit grid over the reference outputs' range ((max - min) / 255).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np
import torch
import torch.fx as fx

from fracfx.errors import ExportError
from fracfx.export.int8_ops import Builder, Int8Reference

FAST_FORMATS = {"int8-fast": False, "int8-fast-vnni": True}  # format -> full int8 weight range (VNNI)
OPSET = 17
WITHIN_STEP = 0.999
TOP1 = 0.999


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


def build_reference(gm: fx.GraphModule, calibration_inputs, *, vnni: bool = False):
    """(Int8Reference, LoweringStats, frozen model) for a transformed or frozen-dequantized model."""
    from fracfx.export.int8_lower import lower
    from fracfx.export.int8_plan import new_points

    frozen = _frozen_dequantized(gm)
    ranges = measure_ranges(frozen, new_points(frozen), calibration_inputs)
    ops, inputs, outputs, stats = lower(frozen, ranges, vnni=vnni)
    return Int8Reference(ops, inputs, outputs), stats, frozen


def to_onnx(reference: Int8Reference, example_inputs, *, fmt: str = "int8-fast"):
    """The ModelProto of a reference: inputs and outputs with a dynamic batch axis."""
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
    helper.set_model_props(model, {"fracfx.format": fmt, "fracfx.ops": json.dumps(reference.op_counts(), separators=(",", ":"))})
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


@dataclasses.dataclass(frozen=True)
class FastLevel:
    level: str
    within_step: float  # fraction of output elements within one output step of the reference
    max_step_error: float
    max_rel_error: float
    top1_agreement: float | None
    fused_ops: dict  # op types of the optimized model (what onnxruntime runs)

    @property
    def integer_kernels(self) -> int:
        return sum(v for k, v in self.fused_ops.items() if k in ("QLinearConv", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm"))


@dataclasses.dataclass(frozen=True)
class FastVerify:
    samples: int
    step: float
    levels: tuple[FastLevel, ...]
    frozen_top1: float | None = None  # the reference's top-1 agreement with the frozen float model (what the format costs)
    frozen_rel_error: float | None = None  # max over samples of max|reference - frozen| / max|frozen|

    def level(self, name: str) -> FastLevel:
        return next(r for r in self.levels if r.level == name)

    @property
    def ok(self) -> bool:
        return all(r.within_step >= WITHIN_STEP and (r.top1_agreement is None or r.top1_agreement >= TOP1) for r in self.levels)


def verify_fast(model, reference: Int8Reference, inputs, *, frozen=None, batch_size: int = 64, threads: int = 1) -> FastVerify:
    import onnx

    from fracfx.export.verify import LEVELS, _run_ort, run_reference, session

    inputs = _tuple(inputs)
    ref = run_reference(reference, inputs, batch_size)
    step = max(float(ref.max() - ref.min()) / 255.0, np.finfo(np.float32).tiny)
    levels = []
    with tempfile.TemporaryDirectory() as tmp:
        for level in LEVELS:
            optimized = os.path.join(tmp, f"{level}.onnx")
            got = _run_ort(session(model, level, threads=threads, optimized_path=optimized), inputs, batch_size)
            ops: dict[str, int] = {}
            for node in onnx.load(optimized).graph.node:
                ops[node.op_type] = ops.get(node.op_type, 0) + 1
            err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            scale = np.maximum(np.abs(ref.reshape(len(ref), -1)).max(axis=1), 1e-30)
            top1 = float((ref.argmax(1) == got.argmax(1)).mean()) if ref.ndim == 2 else None
            levels.append(FastLevel(
                level, float((err <= step).mean()), float(err.max() / step), float((err.reshape(len(ref), -1).max(axis=1) / scale).max()),
                top1, dict(sorted(ops.items())),
            ))
    frozen_top1 = frozen_rel = None
    if frozen is not None:
        base = run_reference(frozen, inputs, batch_size).astype(np.float64)
        frozen_top1 = float((base.argmax(1) == ref.argmax(1)).mean()) if ref.ndim == 2 else None
        diff = np.abs(ref.reshape(len(ref), -1) - base.reshape(len(base), -1)).max(axis=1)
        frozen_rel = float((diff / np.maximum(np.abs(base.reshape(len(base), -1)).max(axis=1), 1e-30)).max())
    return FastVerify(len(ref), step, tuple(levels), frozen_top1, frozen_rel)


@dataclasses.dataclass(frozen=True)
class FastExportReport:
    path: str
    format: str
    opset: int
    file_bytes: int
    stats: object  # int8_lower.LoweringStats
    verify: FastVerify | None = None
    latency: object | None = None  # fracfx.export.verify.LatencyReport
    quantizers: tuple = ()
    frozen_implicitly: bool = True
    freeze_deviation: object | None = None

    def lines(self) -> list[str]:
        s = self.stats
        out = [
            f"wrote {self.path}: {self.file_bytes / 1e6:.3f} MB, format {self.format}, opset {self.opset}",
            f"integer kernels: {s.qconv} QLinearConv ({s.folded_bn} with BatchNorm folded), {s.qlinear} MatMulInteger; "
            f"{s.new_grids} new 8-bit requantization points; {s.requantized_channels} weight channels re-quantized for int16 headroom; "
            f"{s.float_ops} float ops",
        ]
        if self.verify is not None:
            verdict = "met" if self.verify.ok else "NOT MET"
            out.append(f"fast-format contract (>= 99.9 % of elements within one output step, top-1 >= 99.9 %): {verdict}")
            for r in self.verify.levels:
                top1 = "n/a" if r.top1_agreement is None else f"{r.top1_agreement:.4f}"
                out.append(
                    f"onnxruntime {r.level} ({self.verify.samples} inputs): {100 * r.within_step:.3f} % within one step "
                    f"(max {r.max_step_error:.2f} steps, max rel err {r.max_rel_error:.2e}), top-1 agreement {top1}; "
                    f"integer kernels run: {r.integer_kernels}"
                )
            if self.verify.frozen_rel_error is not None:
                top1 = "n/a" if self.verify.frozen_top1 is None else f"{self.verify.frozen_top1:.4f}"
                out.append(f"int8 reference vs the frozen float model (what the format changes): max rel dev "
                           f"{self.verify.frozen_rel_error:.3e}, top-1 agreement {top1}")
        if self.latency is not None:
            lat = self.latency
            out.append(f"latency (batch {lat.batch}, {lat.threads} thread): int8-fast {lat.qdq_ms:.2f} ms vs FP32 {lat.fp32_ms:.2f} ms (x{lat.ratio:.2f})")
        return out


def export_fast(gm, path, example_inputs, *, format: str = "int8-fast", calibration_inputs=None, verify: bool = False,
                verify_inputs=None, latency: bool = False) -> FastExportReport:
    """Write `gm` in a fast int8 format; no file is written when lowering fails (ExportError)."""
    from fracfx.export.pipeline import random_inputs

    if format not in FAST_FORMATS:
        raise ExportError(f"unknown fast format {format!r}; choose one of {sorted(FAST_FORMATS)}")
    example_inputs = _tuple(example_inputs)
    if calibration_inputs is None:
        calibration_inputs = verify_inputs if verify_inputs is not None else random_inputs(gm, example_inputs, 256, seed=3)
    reference, stats, frozen = build_reference(gm, calibration_inputs, vnni=FAST_FORMATS[format])
    model = to_onnx(reference, example_inputs, fmt=format)
    path = os.fspath(path)
    with open(path, "wb") as handle:
        handle.write(model.SerializeToString())
    check = timing = None
    if verify:
        inputs = _tuple(verify_inputs) if verify_inputs is not None else random_inputs(gm, example_inputs, 64)
        check = verify_fast(model, reference, inputs, frozen=frozen)
    if latency:
        from fracfx.export.verify import compare_latency

        timing = compare_latency(path, float_twin(frozen, example_inputs), example_inputs)
    return FastExportReport(path, format, OPSET, os.path.getsize(path), stats, check, timing, frozen.meta.get("fracfx_frozen", ()))
