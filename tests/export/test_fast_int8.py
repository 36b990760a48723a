"""The fast int8 format (fracfx.export.fast_int8): integer kernels, BN folding, agreement, errors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fracfx.errors import ExportError
from fracfx.export import bn_folding
from fracfx.export.fast_int8 import build_reference, export_fast
from fracfx.nn.frozen import FrozenWeight
from tests.export.helpers import TinyResNet, TokenMixer, calibrated, inputs, settle_batchnorm

SHAPE = (3, 12, 12)


def _model(bits: int, *, negative_bn: bool = False):
    torch.manual_seed(0)
    model = settle_batchnorm(TinyResNet(), SHAPE)
    if negative_bn:
        with torch.no_grad():
            for bn in (model.bn, model.layer1.bn2, model.layer2.short[1]):
                bn.weight[::2] *= -1
    return calibrated(model, SHAPE, bits)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_file_runs_integer_kernels_and_meets_the_contract_at_other_batch_sizes(tmp_path, bits):
    torch.set_num_threads(1)
    gm = _model(bits)
    report = export_fast(gm, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE), verify=True, verify_inputs=inputs(75, SHAPE))
    assert report.verify.ok, report.lines()
    for level in ("disable_all", "enable_all"):
        r = report.verify.level(level)
        assert r.within_step >= 0.999 and r.top1_agreement >= 0.999
        assert r.fused_ops.get("QLinearConv") == 6 and "Conv" not in r.fused_ops  # every conv on the integer kernel
    assert report.stats.qconv == 6 and report.stats.folded_bn == 6
    assert report.verify.frozen_top1 >= 0.95  # the format stays close to the trained (frozen) model


def test_negative_batchnorm_factors_fold_exactly(tmp_path):
    gm = _model(6, negative_bn=True)
    report = export_fast(gm, tmp_path / "m.onnx", torch.zeros((2,) + SHAPE), verify=True, verify_inputs=inputs(64, SHAPE))
    assert report.verify.ok and report.stats.folded_bn == 6
    assert report.verify.frozen_top1 >= 0.95


def test_fold_matches_conv_then_batchnorm():
    torch.manual_seed(1)
    bits = 6
    codes = torch.randint(0, 2**bits, (4, 3, 3, 3))
    weight = FrozenWeight(bits, codes, torch.rand(4) * 0.1 + 0.01, torch.tensor([30, 31, 32, 20]))
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.7, 0.0, -2.0]))
        bn.bias.copy_(torch.randn(4))
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
    bias = torch.randn(4)
    folded = bn_folding.fold(weight, bias, bn, limit=127)
    assert folded.requantized == 0 and (folded.scale > 0).all()
    x = torch.randn(2, 3, 8, 8)
    want = bn(F.conv2d(x, weight(), bias)).double()
    got = F.conv2d(x.double(), folded.values.double() * folded.scale.double().view(-1, 1, 1, 1), folded.bias)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_headroom_limits_weights_for_cpus_without_vnni():
    assert bn_folding.headroom_limit(255, vnni=False) == 64  # 255 * (64 + 64) <= 32767
    assert bn_folding.headroom_limit(63, vnni=False) == 127
    assert bn_folding.headroom_limit(255, vnni=True) == 127
    weight = FrozenWeight(8, torch.tensor([[0, 255, 128]]), torch.tensor([0.01]), torch.tensor([0]))
    folded = bn_folding.fold(weight, None, None, limit=64)
    assert folded.requantized == 1 and folded.values.abs().max() == 64
    assert torch.allclose(folded.values.double() * folded.scale.double(), weight().double(), atol=folded.scale.item() / 2 + 1e-9)


@pytest.mark.parametrize("fmt,limit", [("int8-fast", 64), ("int8-fast-vnni", 127)])
def test_weight_range_per_format(tmp_path, fmt, limit):
    gm = _model(8)
    reference, stats, _ = build_reference(gm, inputs(32, SHAPE), vnni=fmt.endswith("vnni"))
    peak = max(int(op.weight.abs().max()) for op in reference.ops if hasattr(op, "weight") and torch.is_tensor(op.weight))
    assert peak <= limit and peak > limit // 2  # the format's range is used, not more
    assert stats.requantized_channels > 0  # 8-bit asymmetric codes (|q - zp| up to 255) never all fit int8


def test_unsupported_op_names_op_module_and_format_and_writes_nothing(tmp_path):
    gm = calibrated(TokenMixer(), (6, 16), 8)
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as info:
        export_fast(gm, path, torch.zeros(1, 6, 16))
    message = str(info.value)
    assert "transpose" in message and "module <root>" in message  # the first op it cannot express, where
    assert "int8-fast" in message and "format='int8'" in message
    assert not os.path.exists(path)


def test_reference_models_the_requantization_rounding():
    gm = _model(8)
    reference, _, frozen = build_reference(gm, inputs(32, SHAPE))
    x = inputs(8, SHAPE)
    out = reference(x)
    assert out.shape == frozen(x).shape
    codes = [op for op in reference.ops if type(op).__name__ == "QConv"]
    env = {reference.input_names[0]: x}
    for op in reference.ops:
        op.run(env)
        if op in codes:
            y = env[op.out]
            assert torch.equal(y, torch.round(y)) and y.min() >= 0 and y.max() <= 255  # uint8 codes


def test_faithful_format_adds_no_rounding_point(tmp_path):
    gm = _model(6)
    report = export_fast(gm, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE), format="int8-fast-faithful", verify=True,
                         verify_inputs=inputs(48, SHAPE))
    assert report.verify.ok and report.stats.new_grids == 0 and report.stats.conv_integer == 4  # stem (before max pooling), two residual branches, the shortcut
    assert report.verify.level("enable_all").fused_ops.get("ConvInteger") == 4
