"""Check an exported file against its frozen PyTorch reference in onnxruntime, and time it.

verify_onnx runs onnx.checker (full_check) and then onnxruntime on the CPU at ORT_DISABLE_ALL
(every node as written: the contract, expected to match the frozen model to float rounding) and at
ORT_ENABLE_ALL (what a deployment gets: fusions may swap in integer kernels; reported, with the
fused op types). The session option `session.qdq_matmulnbits_accuracy_level` is "0" so a
DequantizeLinear(int4) -> MatMul pair that fuses into MatMulNBits keeps FP32 activations.

Errors are relative: per sample, max |ort - ref| / max |ref| (the reference's largest magnitude),
then the max over samples; when the output comes straight from a DequantizeLinear, also in steps
of that quantizer.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import statistics
import tempfile
import time
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

LEVELS = ("disable_all", "enable_all")


@dataclasses.dataclass(frozen=True)
class LevelResult:
    level: str
    max_rel_error: float  # max over samples of max|ort - ref| / max|ref|
    max_abs_error: float
    max_step_error: float | None  # in steps of the output quantizer, when the output is quantized
    top1_agreement: float | None  # fraction of samples with the same argmax (2-D outputs)
    fused_ops: dict[str, int]  # op types onnxruntime introduced at this level (e.g. QLinearConv)


CONTRACT_TOLERANCE = 1e-4  # ORT_DISABLE_ALL vs the frozen model, relative to the largest magnitude


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    samples: int
    levels: tuple[LevelResult, ...]

    def level(self, name: str) -> LevelResult:
        return next(r for r in self.levels if r.level == name)

    @property
    def ok(self) -> bool:
        """The export contract: at ORT_DISABLE_ALL, within CONTRACT_TOLERANCE and the same top-1."""
        strict = self.level("disable_all")
        return strict.max_rel_error <= CONTRACT_TOLERANCE and strict.top1_agreement in (None, 1.0)


def session(model_or_path, level: str = "enable_all", *, threads: int = 1, optimized_path: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{level.upper()}")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _batches(inputs: Sequence[torch.Tensor], batch_size: int):
    total = inputs[0].shape[0]
    for start in range(0, total, batch_size):
        yield tuple(t[start:start + batch_size] for t in inputs)


def _run_ort(sess, inputs, batch_size) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    outs = [sess.run(None, {n: t.numpy() for n, t in zip(names, batch)})[0] for batch in _batches(inputs, batch_size)]
    return np.concatenate(outs)


@torch.no_grad()
def run_reference(frozen, inputs: Sequence[torch.Tensor], batch_size: int = 64) -> np.ndarray:
    outs = []
    for batch in _batches(inputs, batch_size):
        out = frozen(*batch)
        outs.append((out[0] if isinstance(out, (tuple, list)) else out).numpy())
    return np.concatenate(outs)


def _output_step(model: onnx.ModelProto) -> float | None:
    out = model.graph.output[0].name
    producer = next((n for n in model.graph.node if out in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    scale = next((t for t in model.graph.initializer if t.name == producer.input[1]), None)
    values = numpy_helper.to_array(scale) if scale is not None else None
    return float(values) if values is not None and values.size == 1 else None


def compare(ref: np.ndarray, got: np.ndarray, step: float | None = None) -> dict:
    """max relative / absolute / step error and top-1 agreement of `got` against `ref`."""
    ref2, got2 = ref.reshape(len(ref), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
    diff = np.abs(got2 - ref2).max(axis=1)
    scale = np.maximum(np.abs(ref2).max(axis=1), np.finfo(np.float32).tiny)
    top1 = float((ref.argmax(axis=1) == got.argmax(axis=1)).mean()) if ref.ndim == 2 else None
    return {
        "max_rel_error": float((diff / scale).max()),
        "max_abs_error": float(diff.max()),
        "max_step_error": float(diff.max() / step) if step else None,
        "top1_agreement": top1,
    }


def _fused_ops(model: onnx.ModelProto, optimized_path: str) -> dict[str, int]:
    before = {n.op_type for n in model.graph.node}
    after = collections.Counter(n.op_type for n in onnx.load(optimized_path).graph.node)
    return {op: count for op, count in sorted(after.items()) if op not in before}


def verify_onnx(model_or_path, frozen, inputs, *, batch_size: int = 64, threads: int = 1, levels=LEVELS) -> VerifyReport:
    """onnx.checker (full) + onnxruntime at each level against `frozen` on `inputs` (batch first)."""
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    onnx.checker.check_model(model, full_check=True)
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    ref = run_reference(frozen, inputs, batch_size)
    step = _output_step(model)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for level in levels:
            optimized = os.path.join(tmp, f"{level}.onnx")
            sess = session(model, level, threads=threads, optimized_path=optimized)
            got = _run_ort(sess, inputs, batch_size)
            results.append(LevelResult(level=level, fused_ops=_fused_ops(model, optimized), **compare(ref, got, step)))
    return VerifyReport(samples=len(ref), levels=tuple(results))


@dataclasses.dataclass(frozen=True)
class LatencyReport:
    qdq_ms: float  # median onnxruntime latency (ORT_ENABLE_ALL) of the exported model
    fp32_ms: float  # the same network exported without quantizers
    batch: int
    threads: int

    @property
    def ratio(self) -> float:
        return self.qdq_ms / self.fp32_ms


def latency_ms(model_or_path, inputs: Sequence[torch.Tensor], *, runs: int = 20, warmup: int = 3, threads: int = 1) -> float:
    """Median wall time of one onnxruntime run (ORT_ENABLE_ALL) on `inputs`, in milliseconds."""
    sess = session(model_or_path, "enable_all", threads=threads)
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compare_latency(qdq, fp32, inputs, *, runs: int = 20, threads: int = 1) -> LatencyReport:
    """Latency of the QDQ model against its FP32 twin (both ModelProto or paths), same inputs."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return LatencyReport(
        qdq_ms=latency_ms(qdq, inputs, runs=runs, threads=threads),
        fp32_ms=latency_ms(fp32, inputs, runs=runs, threads=threads),
        batch=int(inputs[0].shape[0]),
        threads=threads,
    )


def dataset_accuracy(model_or_path, loader, *, level: str = "enable_all", threads: int = 1) -> tuple[float, int]:
    """(top-1 accuracy in %, samples) of an ONNX model over a (inputs, labels) loader."""
    sess = session(model_or_path, level, threads=threads)
    name = sess.get_inputs()[0].name
    correct = total = 0
    for inputs, labels in loader:
        logits = sess.run(None, {name: inputs.numpy()})[0]
        correct += int((logits.argmax(1) == labels.numpy()).sum())
        total += len(labels)
    return 100.0 * correct / max(total, 1), total
