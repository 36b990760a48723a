"""Reading int8-fast files back (fracfx.export.fast_describe, `fracfx inspect FILE.onnx`): every
number checked against the PyTorch reference the file was written from, or the file's own bytes."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from fracfx.cli import main
from fracfx.export.fast_describe import describe_fast
from fracfx.export.fast_int8 import export_fast
from fracfx.export.int8_ops import ConvIntFloat, QConv
from tests.export.helpers import TinyResNet, calibrated, settle_batchnorm

SHAPE = (3, 12, 12)


def _export(tmp_path, bits: int, fmt: str = "int8-fast"):
    torch.manual_seed(0)
    gm = calibrated(settle_batchnorm(TinyResNet(), SHAPE), SHAPE, bits)
    path = tmp_path / f"m{bits}.onnx"
    report = export_fast(gm, path, torch.zeros((1,) + SHAPE), format=fmt)
    return path, report


def _levels_bits(weight: torch.Tensor) -> int:
    """Independent: per channel, the distinct integer steps it spans after dividing out its gcd."""
    worst = 0
    for row in weight.reshape(weight.shape[0], -1).tolist():
        g = 0
        for v in row:
            g = math.gcd(g, abs(int(v)))
        g = g or 1
        worst = max(worst, (max(row) - min(row)) // g + 1)
    return max(1, math.ceil(math.log2(max(worst, 2))))


@pytest.mark.parametrize("bits,fmt", [(8, "int8-fast"), (4, "int8-fast"), (6, "int8-fast-faithful")])
def test_kernels_match_the_reference_ops(tmp_path, bits, fmt):
    path, report = _export(tmp_path, bits, fmt)
    info = describe_fast(path)
    convs = [op for op in report.reference.ops if isinstance(op, QConv)]
    assert info.format == fmt and info.opset == 17 and info.file_bytes == os.path.getsize(path)
    assert [r.name for r in info.kernels] == [op.out for op in convs]
    for row, op in zip(info.kernels, convs):
        assert row.op == ("ConvInteger" if isinstance(op, ConvIntFloat) else "QLinearConv")
        assert row.shape == "x".join(map(str, op.weight.shape)) and row.channels == op.weight.shape[0]
        assert row.weight_max == int(op.weight.abs().max())
        assert row.weight_bits == _levels_bits(op.weight)
        assert row.input_bits == bits  # the activation quantizers' codes (the stem's too)
        if row.op == "QLinearConv":
            assert row.weight_scale_min == pytest.approx(float(op.w_scale.min())) and row.weight_scale_max == pytest.approx(float(op.w_scale.max()))
            assert f"scale {op.y_scale:.3g}, zp {op.y_zp}" in row.output
        else:
            assert row.output == "float" and row.weight_scale_min is None
    if bits == 4:
        assert {r.weight_bits for r in info.kernels} <= {4, 5}  # 4-bit grids, whatever power of two scales them
    assert info.lowering["qconv"] == report.stats.qconv and info.lowering["new_grids"] == report.stats.new_grids
    int8 = sum(op.weight.numel() for op in convs if not isinstance(op, ConvIntFloat))
    assert info.initializer_bytes.get("int8", 0) >= int8


def test_inspect_describes_a_fast_file_and_still_lists_qdq_quantizers(tmp_path, capsys):
    path, report = _export(tmp_path, 6)
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "int8-fast" and len(data["kernels"]) == report.stats.qconv
    assert data["ops"]["QLinearConv"] == report.stats.qconv
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "int8-fast" in text and "QLinearConv" in text and "new 8-bit requantization points" in text
    assert "not written by" not in text


def test_a_file_fracfx_did_not_write_is_refused_with_the_reason(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), path)
    assert main(["inspect", str(path)]) == 2
    assert "not written by" in capsys.readouterr().err
