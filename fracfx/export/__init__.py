"""From a trained GraphModule to a verified ONNX file: calibrate -> freeze -> export -> verify.

    pipeline.py  calibrate, freeze, export_onnx, random_inputs, describe_onnx (reading a file back)
    verify.py    the file against its frozen PyTorch reference in onnxruntime, and its latency
    accuracy.py  a run's test-set accuracy as trained, at fixed precision and in onnxruntime

ONNX and onnxruntime are imported only when a function that needs them runs.
"""

from fracfx.export.pipeline import (
    ARITHMETIC, Deviation, ExportReport, QdqRow, calibrate, describe_onnx, export_onnx, freeze, freeze_deviation, random_inputs,
)

__all__ = [
    "ARITHMETIC", "Deviation", "ExportReport", "QdqRow", "calibrate", "describe_onnx", "export_onnx", "freeze",
    "freeze_deviation", "random_inputs",
]
