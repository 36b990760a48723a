"""Public export pipeline: calibrate -> freeze -> export_onnx (-> verify), and reading files back.

    frozen = fracfx.freeze(qm)                       # or bits=(a, w)
    report = fracfx.export_onnx(qm, "m.onnx", x, format="int8", verify=True)

export_onnx accepts a frozen model or a transformed one; a transformed model is frozen implicitly
at the bits in force (report.frozen_implicitly), and then the report also measures what freezing
changed (report.freeze_deviation: the unfrozen eval model against the frozen one, i.e. the effect
of moving each lo onto the integer zero-point grid). To freeze at other bits, call freeze() first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Iterable

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fracfx.errors import ExportError
from fracfx.meta import ACT_QUANT, FROZEN, WEIGHT_QUANT, FrozenQuant, is_frozen
from fracfx.nn.mixed import MixedActQuant
from fracfx.nn.quantizers import QUANTIZER_TYPES, ActQuant


def _as_tuple(inputs) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _tracks_range(module: nn.Module) -> bool:
    """The quantizers that keep a running activation range: ActQuant and DFQ's MixedActQuant."""
    return isinstance(module, (ActQuant, MixedActQuant))


@torch.no_grad()
def calibrate(gm: nn.Module, batches: Iterable) -> nn.Module:
    """Set every activation quantizer's running range to the mean per-batch (min, max - min).

    In place (like training); BatchNorm and everything else run in eval mode and do not move.
    Each batch is a tensor or a tuple of inputs. Returns gm.
    """
    quantizers = [m for m in gm.modules() if _tracks_range(m)]
    momenta = [q.momentum for q in quantizers]
    count = 0
    with _eval_mode(gm):
        for q in quantizers:
            q.train()
        try:
            for count, batch in enumerate(batches, 1):
                for q in quantizers:
                    q.momentum = 1.0 - 1.0 / count  # running value = mean over the batches so far
                gm(*_as_tuple(batch))
        finally:
            for q, m in zip(quantizers, momenta):
                q.momentum = m
    if count == 0:
        raise ExportError("calibrate got no batches; pass an iterable of input tensors")
    return gm


ARITHMETIC = ("integer", "dequantized")
EXACT_LIMIT = 2**24  # float32 represents every integer up to this exactly


def freeze(gm: fx.GraphModule, *, bits: tuple[int | None, int | None] | None = None, arithmetic: str = "integer") -> fx.GraphModule:
    """A fixed-precision, eval-only copy of a transformed model: the exact ONNX reference.

    bits=None keeps each quantizer's bits; bits=(a, w) sets every activation / weight quantizer.
    arithmetic="integer" (default) runs quantized ops on integer codes and rescales after them, so
    any runtime reproduces the frozen model bit for bit (fracfx.passes.integer_arithmetic);
    "dequantized" is classic QDQ (the op reads (q - zp) * s), which runtimes may fuse into integer
    kernels but whose float reassociation makes deep 6-8 bit networks drift by quantization flips.
    """
    from fracfx.passes.freeze_precision import freeze_precision
    from fracfx.passes.infra import run_pipeline, step
    from fracfx.passes.integer_arithmetic import integer_arithmetic

    _require_graph_module(gm)
    if arithmetic not in ARITHMETIC:
        raise ExportError(f"arithmetic must be one of {ARITHMETIC}, got {arithmetic!r}")
    return run_pipeline(gm, [
        step(freeze_precision, bits=bits),
        step(integer_arithmetic, when=arithmetic == "integer"),
    ])


def partial_sum_bound(frozen: fx.GraphModule) -> dict[str, float]:
    """Per integer conv/linear: worst-case |partial sum| / 2^24 (< 1: exact in any summation order).

    The bound is max |q_x - zp_x| times the largest per-channel L1 norm of q_w - zp_w.
    """
    from fracfx.meta import get_quant_spec
    from fracfx.nn.frozen import FrozenActQuant, FrozenWeight

    found = {}
    for node in frozen.graph.nodes:
        if node.op != "call_function" or get_quant_spec(node) is None or len(node.args) < 2:
            continue
        mods = [frozen.get_submodule(a.target) if isinstance(a, fx.Node) and a.op == "call_module" else None for a in node.args[:2]]
        act, weight = mods
        if not (isinstance(act, FrozenActQuant) and isinstance(weight, FrozenWeight) and act.centered and weight.centered):
            continue
        x_max = max(int(act.zero_point), act.qmax - int(act.zero_point))
        w = (weight.codes - weight._broadcast(weight.zero_point)).abs().float().movedim(weight.axis, 0)
        found[node.name] = x_max * w.reshape(w.shape[0], -1).sum(dim=1).max().item() / EXACT_LIMIT
    return found


def _require_graph_module(gm) -> None:
    if not isinstance(gm, fx.GraphModule) or (FROZEN not in gm.meta and not any(isinstance(m, QUANTIZER_TYPES) for m in gm.modules())):
        raise ExportError(
            f"expected a model transformed by fracfx.transform (a GraphModule with quantizers), got {type(gm).__name__}; "
            "run fracfx.transform(model, config) and train or calibrate it first (for a float model use torch.onnx.export)"
        )


@dataclasses.dataclass(frozen=True)
class Deviation:
    """How far one model's outputs are from another's on the same inputs."""

    samples: int
    max_rel_error: float  # max over samples of max|b - a| / max|a|
    mean_rel_error: float
    top1_agreement: float | None


def freeze_deviation(gm: fx.GraphModule, frozen: fx.GraphModule, inputs, *, batch_size: int = 64) -> Deviation:
    """The unfrozen eval model (training grid) against the frozen one (integer grid).

    Run at the bits gm has now; freeze with bits=None for a like-for-like comparison.
    """
    from fracfx.export.verify import run_reference, top1_agreement

    inputs = _as_tuple(inputs)
    with _eval_mode(gm):
        ref = run_reference(gm, inputs, batch_size)
    got = run_reference(frozen, inputs, batch_size)
    a, b = ref.reshape(len(ref), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
    rel = np.abs(b - a).max(axis=1) / np.maximum(np.abs(a).max(axis=1), 1e-30)
    return Deviation(len(ref), float(rel.max()), float(rel.mean()), top1_agreement(ref, got))


@dataclasses.dataclass(frozen=True)
class ExportReport:
    path: str
    format: str
    opset: int
    file_bytes: int
    quantizers: tuple[FrozenQuant, ...]  # what freeze fixed, incl. how far the zero-point grid moved
    frozen_implicitly: bool
    freeze_deviation: Deviation | None = None
    verify: object | None = None  # fracfx.export.verify.VerifyReport
    latency: object | None = None  # fracfx.export.verify.LatencyReport
    note: str | None = None  # why format "auto" chose this format

    def lines(self) -> list[str]:
        """Human-readable summary (the CLI prints it)."""
        acts = [q for q in self.quantizers if q.role == ACT_QUANT]
        weights = [q for q in self.quantizers if q.role == WEIGHT_QUANT]
        bits = sorted({(q.role[0], q.bits) for q in self.quantizers})
        out = [
            *([] if self.note is None else [self.note]),
            f"wrote {self.path}: {self.file_bytes / 1e6:.3f} MB, format {self.format}, opset {self.opset}",
            f"quantizers: {len(acts)} activation, {len(weights)} weight; bits {', '.join(f'{r}{b}' for r, b in bits)}",
            "zero-point grid: lo moved by at most "
            f"{max((q.max_shift_steps for q in acts), default=0):.3f} steps (activations), "
            f"{max((q.max_shift_steps for q in weights), default=0):.3f} (weights); "
            f"channels widened to include 0: {sum(q.extended for q in self.quantizers)}"
            f" (step grown up to x{max((q.max_step_growth for q in self.quantizers), default=1.0):.2f})",
        ]
        if self.freeze_deviation is not None:
            d = self.freeze_deviation
            top1 = "n/a" if d.top1_agreement is None else f"{d.top1_agreement:.4f}"
            out.append(f"freeze vs unfrozen eval ({d.samples} inputs): max rel dev {d.max_rel_error:.3e}, mean {d.mean_rel_error:.3e}, top-1 agreement {top1}")
        if self.verify is not None:
            verdict = "met" if self.verify.ok else "NOT MET"
            out.append(f"export contract ({self.verify.contract()}): {verdict}")
            for r in self.verify.levels:
                top1 = "n/a" if r.top1_agreement is None else f"{r.top1_agreement:.4f}"
                fused = ", ".join(f"{k} x{v}" for k, v in r.fused_ops.items()) or "none"
                within = "" if r.within_tolerance == 1.0 else f" ({r.within_tolerance:.2%} of elements within 1e-4)"
                out.append(f"onnxruntime {r.level} ({self.verify.samples} inputs): max rel err {r.max_rel_error:.3e}{within}, "
                           f"top-1 agreement {top1}; fused: {fused}")
        if self.latency is not None:
            lat = self.latency
            out.append(f"latency (batch {lat.batch}, {lat.threads} thread): QDQ {lat.qdq_ms:.2f} ms vs FP32 {lat.fp32_ms:.2f} ms (x{lat.ratio:.2f})")
        return out


def export_onnx(
    gm: fx.GraphModule,
    path: str | os.PathLike,
    example_inputs,
    *,
    format: str = "int8",
    opset: int | None = None,
    verify: bool = False,
    verify_inputs=None,
    latency: bool = False,
    arithmetic: str = "integer",
    calibration_inputs=None,
    verify_label: str | None = None,
) -> ExportReport:
    """Write `gm` (frozen, or transformed: frozen implicitly at its current bits) as a QDQ ONNX file.

    example_inputs (and verify_inputs) are a tensor, a tuple, or for a model captured with keyword
    inputs (Hugging Face) a dict {name: tensor}; such a model is exported flat, its ONNX inputs
    and outputs named after the keywords and output fields (input_ids -> logits).
    verify=True checks the file (onnx.checker full_check, onnxruntime at ORT_DISABLE_ALL and
    ORT_ENABLE_ALL) against the frozen model on `verify_inputs` (batch first; default: 64 seeded
    N(0, 1) samples shaped like example_inputs). latency=True times it against its FP32 twin.
    arithmetic is used only when gm is frozen here (see freeze). format "int8" / "int4" is the exact
    QDQ form; "int8-fast" / "int8-fast-vnni" run on onnxruntime's integer kernels (fracfx.export.fast_int8);
    "auto" (the CLI's default) is int8-fast where that format can express every op, else int8
    (transformers: onnxruntime fuses its linears into MatMulIntegerToFloat), and report.note says why.
    calibration_inputs and verify_label are the fast formats' (fast_int8.export_fast); the exact
    formats ignore them.
    """
    if format == "auto":
        from fracfx.errors import FormatError

        try:
            return export_onnx(gm, path, example_inputs, format="int8-fast", verify=verify, verify_inputs=verify_inputs, latency=latency,
                               calibration_inputs=calibration_inputs, verify_label=verify_label)
        except FormatError as error:  # an op the fast format has no form for (e.g. LayerNorm): the exact format writes it
            report = export_onnx(gm, path, example_inputs, format="int8", opset=opset, verify=verify, verify_inputs=verify_inputs,
                                 latency=latency, arithmetic=arithmetic)
            return dataclasses.replace(report, note=f"format auto: int8 (exact QDQ), since {error}")
    if format.startswith("int8-fast"):
        from fracfx.export.fast_int8 import export_fast

        return export_fast(gm, path, example_inputs, format=format, calibration_inputs=calibration_inputs, verify=verify,
                           verify_inputs=verify_inputs, verify_label=verify_label, latency=latency)
    from fracfx.export.flat_io import flat_inputs, positional
    from fracfx.export.onnx_model import export_float_model, export_onnx_model, resolve_opset

    opset = resolve_opset(format, opset)
    _require_graph_module(gm)
    example_inputs = flat_inputs(gm, example_inputs)
    implicit = not is_frozen(gm)
    frozen = freeze(gm, arithmetic=arithmetic) if implicit else gm
    model = export_onnx_model(frozen, example_inputs, fmt=format, opset=opset)
    path = os.fspath(path)
    with open(path, "wb") as handle:
        handle.write(model.SerializeToString())
    deviation = check = timing = None
    if verify:
        from fracfx.export.verify import verify_onnx

        inputs = flat_inputs(gm, verify_inputs) if verify_inputs is not None else random_inputs(gm, example_inputs, 64)
        check = verify_onnx(path, positional(frozen), inputs)
        if implicit:
            deviation = freeze_deviation(positional(gm), positional(frozen), inputs)
    if latency:
        from fracfx.export.verify import compare_latency

        timing = compare_latency(path, export_float_model(frozen, example_inputs), example_inputs)
    return ExportReport(
        path=path, format=format, opset=opset, file_bytes=os.path.getsize(path), quantizers=frozen.meta[FROZEN],
        frozen_implicitly=implicit, freeze_deviation=deviation, verify=check, latency=timing,
    )


_EMBEDDING_FUNCTIONS = (torch.nn.functional.embedding, torch.ops.aten.embedding.default)


def _vocabulary(gm: nn.Module) -> int | None:
    """Rows of the model's first embedding table: an nn.Embedding, or (a graph captured with
    torch.export) the weight of its first embedding call."""
    found = next((m.num_embeddings for m in gm.modules() if isinstance(m, nn.Embedding)), None)
    if found is not None or not isinstance(gm, fx.GraphModule):
        return found
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _EMBEDDING_FUNCTIONS:
            weight = node.args[0] if node.target is torch.ops.aten.embedding.default else node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                return int(_get_attr(gm, weight.target).shape[0])
    return None


def _get_attr(gm: nn.Module, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def random_inputs(gm: nn.Module, example_inputs, count: int, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """`count` seeded samples shaped like each example input (batch first), for verify.

    Float inputs get N(0, 1); integer inputs are token ids, drawn uniformly from the vocabulary
    of the model's first nn.Embedding (a language model's token embedding), except that an
    integer input whose example holds only 0s and 1s is an attention mask and is all ones.
    """
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for example in _as_tuple(example_inputs):
        shape = (count,) + tuple(example.shape[1:])
        if example.dtype.is_floating_point:
            samples.append(torch.randn(shape, generator=generator).to(example.dtype))
            continue
        if example.dtype != torch.bool and example.numel() and bool(((example == 0) | (example == 1)).all()) and int(example.max()) == 1:
            samples.append(torch.ones(shape, dtype=example.dtype))
            continue
        vocab = _vocabulary(gm)
        if vocab is None:
            raise ExportError(
                f"the example input is {example.dtype} but the model has no nn.Embedding to say which ids are valid; "
                "pass verify_inputs=... (CLI: export without --verify)"
            )
        samples.append(torch.randint(0, vocab, shape, generator=generator, dtype=example.dtype))
    return tuple(samples)


@dataclasses.dataclass(frozen=True)
class QdqRow:
    """One quantizer of an exported file, as `fracfx inspect model.onnx` lists it."""

    name: str  # the quantizer's key (submodule path in the frozen model)
    role: str  # "act" | "weight"
    bits: int
    dtype: str  # storage type of the codes: "uint8" | "uint4"
    channels: int
    scale_min: float
    scale_max: float
    zero_point_min: int
    zero_point_max: int
    centered: bool  # DequantizeLinear has scale 1 (integer arithmetic); the scale is applied after the op


def describe_onnx(path: str | os.PathLike) -> list[QdqRow]:
    """The quantizers of a file fracfx exported, in graph order (from its fracfx metadata)."""
    import onnx
    from onnx import TensorProto

    from fracfx.export.qdq import METADATA_KEY

    model = onnx.load(os.fspath(path))
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{os.fspath(path)} was not written by fracfx.export_onnx (no fracfx.quantizers metadata)")
    types = {t.name: TensorProto.DataType.Name(t.data_type).lower() for t in model.graph.initializer}
    rows = []
    for r in json.loads(props[METADATA_KEY]):
        key = r["key"]
        dtype = types.get(f"{key}.codes" if r["role"] == "weight" else f"{key}.zero_point", "?")
        rows.append(QdqRow(
            name=key, role=r["role"], bits=r["bits"], dtype=dtype, channels=r["channels"], scale_min=r["scale_min"],
            scale_max=r["scale_max"], zero_point_min=r["zero_point_min"], zero_point_max=r["zero_point_max"], centered=r["centered"],
        ))
    return rows
