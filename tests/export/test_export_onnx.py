"""export_onnx: file structure, onnxruntime agreement with the frozen model, formats, errors."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

import fracfx
from fracfx.errors import ExportError
from fracfx.export import describe_onnx, export_onnx, freeze
from fracfx.export.verify import compare, session, verify_onnx
from tests.export.helpers import TinyResNet, TokenMixer, calibrated, inputs, settle_batchnorm

SHAPE = (3, 16, 16)
TOL = 1e-4  # of the largest logit magnitude, per sample


def _tiny(bits: int, **kw):
    return calibrated(settle_batchnorm(TinyResNet(), SHAPE), SHAPE, bits, **kw)


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("bits", [8, 6, 4, 3])
def test_tiny_resnet_matches_frozen_model_in_onnxruntime(tmp_path, bits):
    gm = _tiny(bits)
    report = export_onnx(gm, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE), verify=True, verify_inputs=inputs(64, SHAPE))
    strict = report.verify.level("disable_all")
    assert strict.max_rel_error < TOL and strict.top1_agreement == 1.0 and report.verify.ok
    assert report.verify.level("enable_all").max_rel_error < 1.0  # reported; its numbers depend on the CPU's fusions
    assert report.frozen_implicitly and report.freeze_deviation.samples == 64


def test_verify_catches_a_file_that_is_not_the_reference(tmp_path):
    gm = _tiny(4)
    export_onnx(gm, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE))
    wrong = verify_onnx(tmp_path / "m.onnx", freeze(gm, bits=(3, 4)), inputs(32, SHAPE))
    assert not wrong.ok and wrong.level("disable_all").max_rel_error > 1e-2


def test_file_structure(tmp_path):
    gm = _tiny(4)
    export_onnx(gm, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE))
    model = onnx.load(tmp_path / "m.onnx")
    ops = _ops(model)
    assert ops["QuantizeLinear"] == 6 and ops["Clip"] == 6 and ops["DequantizeLinear"] == 12
    assert "BatchNormalization" not in ops and ops["Conv"] == 6 and ops["Gemm"] == 1  # FP32 classifier as-is
    assert not any(n.domain for n in model.graph.node) and all(o.domain in ("", "ai.onnx") for o in model.opset_import)
    codes = _init(model, "fracfx_quant.layer1_conv1.weight.codes")
    assert codes.data_type == TensorProto.UINT8 and tuple(codes.dims) == (8, 8, 3, 3)
    assert numpy_helper.to_array(codes).max() <= 15
    clip_max = _init(model, "fracfx_quant.layer1_conv1.act.qmax")
    assert numpy_helper.to_array(clip_max) == 15
    float_weights = [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 4]
    assert not float_weights  # every conv weight is stored as integer codes
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"
    sess = session(model, "disable_all")
    for n in (1, 5):
        assert sess.run(None, {"input": inputs(n, SHAPE).numpy()})[0].shape == (n, 10)


def test_eight_bits_needs_no_clip(tmp_path):
    export_onnx(_tiny(8), tmp_path / "m.onnx", torch.zeros((1,) + SHAPE))
    ops = _ops(onnx.load(tmp_path / "m.onnx"))
    assert ops["QuantizeLinear"] == 6 and "Clip" not in ops


def test_int4_file_is_smaller_and_still_exact(tmp_path):
    gm = _tiny(4)
    gm_wide = calibrated(settle_batchnorm(TinyResNet(width=64), SHAPE), SHAPE, 4)
    for name, model in (("small", gm), ("wide", gm_wide)):
        r8 = export_onnx(model, tmp_path / f"{name}8.onnx", torch.zeros((1,) + SHAPE))
        r4 = export_onnx(model, tmp_path / f"{name}4.onnx", torch.zeros((1,) + SHAPE), format="int4", verify=True, verify_inputs=inputs(32, SHAPE))
        assert r4.opset == 21 and r4.verify.level("disable_all").max_rel_error < TOL
        if name == "wide":  # weights dominate the file
            assert r4.file_bytes <= 0.6 * r8.file_bytes
    codes = _init(onnx.load(tmp_path / "wide4.onnx"), "fracfx_quant.layer1_conv1.weight.codes")
    assert codes.data_type == TensorProto.UINT4 and len(codes.raw_data) == 64 * 64 * 9 // 2


def test_matmul_and_3d_linear(tmp_path):
    model = TokenMixer()
    shape = (6, 16)
    gm = calibrated(model, shape, 6)
    report = export_onnx(gm, tmp_path / "t.onnx", torch.zeros((1,) + shape), verify=True, verify_inputs=inputs(64, shape))
    assert report.verify.level("disable_all").max_rel_error < TOL
    assert sum(q.role == "act_quant" for q in report.quantizers) == 4  # q, k inputs and both matmul operands


def test_dequantized_arithmetic_is_classic_qdq(tmp_path):
    gm = _tiny(4)
    frozen = freeze(gm, arithmetic="dequantized")
    export_onnx(frozen, tmp_path / "d.onnx", torch.zeros((1,) + SHAPE))
    model = onnx.load(tmp_path / "d.onnx")
    assert "BatchNormalization" in _ops(model) and "Mul" not in _ops(model)
    scales = numpy_helper.to_array(_init(model, "fracfx_quant.stem.weight.scale"))
    assert np.allclose(scales, frozen.get_submodule("fracfx_quant.stem.weight").scale.numpy())
    report = verify_onnx(tmp_path / "d.onnx", frozen, inputs(32, SHAPE))
    assert report.level("disable_all").top1_agreement == 1.0


def test_describe_onnx(tmp_path):
    gm = _tiny(3)
    export_onnx(gm, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE), format="int4")
    rows = describe_onnx(tmp_path / "m.onnx")
    assert [r.role for r in rows].count("act") == 6 and [r.role for r in rows].count("weight") == 6
    stem = next(r for r in rows if r.name == "fracfx_quant.stem.weight")
    assert stem.bits == 3 and stem.dtype == "uint4" and stem.channels == 8 and 0 <= stem.zero_point_min <= stem.zero_point_max <= 7
    act = next(r for r in rows if r.name == "fracfx_quant.layer1_conv1.act")
    assert act.dtype == "uint8" and act.zero_point_min == 0  # post-ReLU range starts at 0
    with pytest.raises(ExportError, match="not written by fracfx"):
        describe_onnx(_plain_onnx(tmp_path))


def _plain_onnx(tmp_path):
    path = tmp_path / "plain.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), path)
    return path


def test_int4_refuses_wide_weights_naming_the_node(tmp_path):
    gm = _tiny(6)
    with pytest.raises(ExportError, match=r"stem.*6-bit weights.*int4.*format='int8'"):
        export_onnx(gm, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE), format="int4")
    assert not (tmp_path / "m.onnx").exists()


def test_activation_bits_beyond_the_carrier(tmp_path):
    gm = _tiny(4)
    fracfx.set_bits(gm, act_bits=12)
    with pytest.raises(ExportError, match=r"12-bit activations.*uint8"):
        export_onnx(gm, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE))


def test_bad_format_and_opset(tmp_path):
    gm = _tiny(4)
    with pytest.raises(ExportError, match="unknown export format 'int2'"):
        export_onnx(gm, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE), format="int2")
    with pytest.raises(ExportError, match="int4.*opset in 21"):
        export_onnx(gm, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE), format="int4", opset=17)


class _WithCummax(TinyResNet):
    def forward(self, x):
        return torch.cummax(super().forward(x), dim=1)[0]


def test_unsupported_op_names_the_node(tmp_path):
    gm = calibrated(settle_batchnorm(_WithCummax(), SHAPE), SHAPE, 4)
    with pytest.raises(ExportError, match=r"at node\(s\) cummax.*aten::cummax.*register_custom_op_symbolic"):
        export_onnx(gm, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE))


def test_plain_module_is_refused(tmp_path):
    with pytest.raises(ExportError, match="fracfx.transform"):
        export_onnx(TinyResNet(), tmp_path / "m.onnx", torch.zeros((1,) + SHAPE))


def test_frozen_model_exports_without_refreezing(tmp_path):
    frozen = freeze(_tiny(4), bits=(3, 3))
    report = export_onnx(frozen, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE))
    assert not report.frozen_implicitly and {q.bits for q in report.quantizers} == {3}


def test_latency_report(tmp_path):
    report = export_onnx(_tiny(4), tmp_path / "m.onnx", torch.zeros((1,) + SHAPE), latency=True)
    assert report.latency.qdq_ms > 0 and report.latency.fp32_ms > 0
    assert any("latency" in line for line in report.lines())


def test_compare_counts_disagreements():
    ref = np.array([[1.0, 2.0], [3.0, 1.0]], dtype=np.float32)
    got = np.array([[1.0, 2.0 + 1e-3], [0.0, 1.0]], dtype=np.float32)
    result = compare(ref, got)
    assert result["top1_agreement"] == 0.5 and result["max_rel_error"] == pytest.approx(1.0)
