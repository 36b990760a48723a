"""What ORT_ENABLE_ALL does to fracfx files: the DESIGN.md traps, checked on the CPU the tests run on.

Full-range 8-bit weights in a QDQ Conv that onnxruntime fuses into QLinearConv saturate on
AVX2 CPUs without VNNI when the weights are int8 (the u8s8 kernel multiplies with vpmaddubsw).
fracfx stores weight codes as uint8 with per-channel zero points, which the u8u8 kernel widens to
16 bits before multiplying, so the fused kernel stays exact up to requantization rounding. In the
default integer arithmetic no Q follows the op directly, so nothing fuses into QLinearConv at all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracfx
from fracfx.export import export_onnx, freeze
from fracfx.export.verify import verify_onnx
from tests.export.helpers import calibrated, inputs

SHAPE = (3, 12, 12)


class ConvChain(nn.Module):
    """Convs feeding convs directly (no BatchNorm): the pattern onnxruntime fuses into QLinearConv."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def chain():
    torch.manual_seed(3)
    return calibrated(ConvChain(), SHAPE, 8, keep_fp32=())


def test_fused_qlinearconv_with_full_range_8bit_weights_does_not_saturate(tmp_path, chain):
    frozen = freeze(chain, arithmetic="dequantized")
    ranges = [(m.codes.flatten(1).amin(1), m.codes.flatten(1).amax(1)) for m in frozen.modules() if hasattr(m, "codes")]
    assert all(bool((lo == 0).all() and (hi == 255).all()) for lo, hi in ranges)  # every channel spans all 256 codes
    export_onnx(frozen, tmp_path / "d.onnx", torch.zeros((1,) + SHAPE))
    report = verify_onnx(tmp_path / "d.onnx", frozen, inputs(64, SHAPE))
    full = report.level("enable_all")
    if "QLinearConv" not in full.fused_ops:
        pytest.skip(f"onnxruntime did not fuse QLinearConv on this CPU (fused: {full.fused_ops})")
    assert report.level("disable_all").max_rel_error < 1e-5
    assert full.max_rel_error < 5e-3 and full.top1_agreement == 1.0  # requantization rounding only; saturation is ~20 LSB


def test_integer_arithmetic_is_exact_even_with_all_fusions(tmp_path, chain):
    frozen = freeze(chain)
    export_onnx(frozen, tmp_path / "i.onnx", torch.zeros((1,) + SHAPE))
    report = verify_onnx(tmp_path / "i.onnx", frozen, inputs(64, SHAPE))
    assert "QLinearConv" not in report.level("enable_all").fused_ops
    for level in report.levels:
        assert level.max_rel_error < 1e-6, level


def test_int4_linear_keeps_fp32_activations(tmp_path):
    """DQ(int4) -> MatMul may fuse into MatMulNBits; accuracy level 0 keeps its activations FP32."""
    from tests.export.helpers import TokenMixer

    gm = calibrated(TokenMixer(), (6, 16), 4)
    report = export_onnx(gm, tmp_path / "t.onnx", torch.zeros(1, 6, 16), format="int4", verify=True, verify_inputs=inputs(64, (6, 16)))
    for level in report.verify.levels:
        assert level.max_rel_error < 1e-4, level
