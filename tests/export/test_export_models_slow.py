"""Export + verify of real architectures at 8, 6, 4 and 3 bits on 512 inputs (slow: -m slow).

Untrained networks with settled BatchNorm statistics and calibrated activation ranges: the
contract checked here is the export's (the file computes what the frozen model computes), which
does not depend on the weights being trained.
"""

from __future__ import annotations

import pytest
import torch

from fracfx.export import export_onnx
from fracfx.models import build_model
from tests.export.helpers import calibrated, inputs, settle_batchnorm

SHAPE = (3, 32, 32)
MODELS = ("cifar_resnet38", "cifar_mobilenet_v2", "resnet18", "mobilenet_v2")  # issue 5 must-show


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 6, 4, 3])
@pytest.mark.parametrize("name", MODELS)
def test_architecture_matches_frozen_model_on_512_inputs(tmp_path, name, bits):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gm = calibrated(settle_batchnorm(build_model(name, num_classes=10), SHAPE), SHAPE, bits)
    report = export_onnx(gm, tmp_path / "m.onnx", torch.zeros((1,) + SHAPE), verify=True, verify_inputs=inputs(512, SHAPE))
    strict, full = report.verify.level("disable_all"), report.verify.level("enable_all")
    print(f"\n{name} a{bits}w{bits}: " + " | ".join(report.lines()[1:]))
    assert report.verify.samples == 512
    assert strict.max_rel_error < 1e-4 and strict.top1_agreement == 1.0
    assert full.top1_agreement is not None  # ENABLE_ALL is reported, not part of the contract


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_int4_file_is_at_most_six_tenths_of_int8(tmp_path, name):
    torch.set_num_threads(1)
    gm = calibrated(settle_batchnorm(build_model(name, num_classes=10), SHAPE), SHAPE, 4)
    example = torch.zeros((1,) + SHAPE)
    r8 = export_onnx(gm, tmp_path / "m8.onnx", example)
    r4 = export_onnx(gm, tmp_path / "m4.onnx", example, format="int4", verify=True, verify_inputs=inputs(64, SHAPE))
    print(f"\n{name}: int8 {r8.file_bytes} B, int4 {r4.file_bytes} B, ratio {r4.file_bytes / r8.file_bytes:.3f}")
    assert r4.file_bytes <= 0.6 * r8.file_bytes
    assert r4.verify.level("disable_all").max_rel_error < 1e-4
