"""Verification and report of a fast-int8 export (fracfx.export.fast_int8).

The agreement contract, at ORT_DISABLE_ALL and ORT_ENABLE_ALL against the PyTorch reference
(Int8Reference): per-element error within one output step for >= 99.9 % of elements and top-1
agreement >= 99.9 %. The output step is that of an 8-bit grid over the reference outputs' range
((max - min) / 255). The report also measures what the format changes against the frozen float
model, on the same inputs: its own rounding points (new 8-bit grids on float branches, weights
re-quantized for headroom, the int32 bias). That comparison means what the inputs mean: on test
images it is the format's effect on the model's decisions; on seeded N(0, 1) noise (the default
verify inputs) activations leave the trained ranges, the new 8-bit grids (set from the training
data's BatchNorm statistics) saturate, and deep networks disagree far more than on data, so the
line says which inputs it used and, for noise, that it is no accuracy measure.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

from fracfx.export.int8_ops import Int8Reference

WITHIN_STEP = 0.999
TOP1 = 0.999


def _tuple(inputs):
    import torch

    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


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
        return sum(v for k, v in self.fused_ops.items() if k in ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm"))


@dataclasses.dataclass(frozen=True)
class FastVerify:
    samples: int
    step: float
    levels: tuple[FastLevel, ...]
    frozen_top1: float | None = None  # the reference's top-1 agreement with the frozen float model (what the format costs)
    frozen_rel_error: float | None = None  # max over samples of max|reference - frozen| / max|frozen|
    inputs: str = "inputs"  # what the samples are, e.g. "test images" or NOISE

    def level(self, name: str) -> FastLevel:
        return next(r for r in self.levels if r.level == name)

    @property
    def ok(self) -> bool:
        return all(r.within_step >= WITHIN_STEP and (r.top1_agreement is None or r.top1_agreement >= TOP1) for r in self.levels)


NOISE = "seeded N(0, 1) inputs"


def verify_fast(model, reference: Int8Reference, inputs, *, frozen=None, batch_size: int = 64, threads: int = 1,
                inputs_label: str = "inputs") -> FastVerify:
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
    return FastVerify(len(ref), step, tuple(levels), frozen_top1, frozen_rel, inputs_label)


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
            f"integer kernels: {s.qconv} QLinearConv, {s.conv_integer} ConvInteger ({s.folded_bn} with BatchNorm folded), {s.qlinear} MatMulInteger; "
            f"{s.new_grids} new 8-bit requantization points; {s.requantized_channels} weight channels re-quantized for int16 headroom; "
            f"{s.float_ops} float ops",
        ]
        if self.verify is not None:
            verdict = "met" if self.verify.ok else "NOT MET"
            out.append(f"fast-format contract (>= 99.9 % of elements within one output step, top-1 >= 99.9 %): {verdict}")
            for r in self.verify.levels:
                top1 = "n/a" if r.top1_agreement is None else f"{r.top1_agreement:.4f}"
                out.append(
                    f"onnxruntime {r.level} ({self.verify.samples} {self.verify.inputs}): {100 * r.within_step:.3f} % within one step "
                    f"(max {r.max_step_error:.2f} steps, max rel err {r.max_rel_error:.2e}), top-1 agreement {top1}; "
                    f"integer kernels run: {r.integer_kernels}"
                )
            if self.verify.frozen_rel_error is not None:
                top1 = "n/a" if self.verify.frozen_top1 is None else f"{self.verify.frozen_top1:.4f}"
                noise = " (noise outside the trained ranges, where the new 8-bit grids saturate: not an accuracy measure)"
                out.append(f"the format's own roundings (int8 reference vs the frozen model on the same {self.verify.samples} "
                           f"{self.verify.inputs}{noise if self.verify.inputs == NOISE else ''}): max rel dev "
                           f"{self.verify.frozen_rel_error:.3e}, top-1 agreement {top1}")
        if self.latency is not None:
            lat = self.latency
            out.append(f"latency (batch {lat.batch}, {lat.threads} thread): int8-fast {lat.qdq_ms:.2f} ms vs FP32 {lat.fp32_ms:.2f} ms (x{lat.ratio:.2f})")
        return out
