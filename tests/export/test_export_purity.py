"""The export passes are pure: their input GraphModule is left exactly as it was."""

from __future__ import annotations

import torch

from fracfx.export import freeze
from fracfx.export.onnx_model import export_onnx_model
from fracfx.passes.freeze_precision import freeze_precision
from fracfx.passes.integer_arithmetic import integer_arithmetic
from tests.export.helpers import TinyResNet, calibrated, settle_batchnorm

SHAPE = (3, 16, 16)


def _snapshot(gm):
    return {
        "code": gm.code,
        "modules": {name: (type(m), m.training) for name, m in gm.named_modules()},
        "state": {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)},
        "meta": [(n.name, sorted(n.meta)) for n in gm.graph.nodes],
        "owner": gm.graph.owning_module is gm,
    }


def _same(before, after):
    assert after["code"] == before["code"] and after["modules"] == before["modules"]
    assert after["meta"] == before["meta"] and after["owner"] and before["owner"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def test_freeze_integer_and_export_passes_leave_their_input_untouched():
    gm = calibrated(settle_batchnorm(TinyResNet(), SHAPE), SHAPE, 4)
    before = _snapshot(gm)
    frozen = freeze_precision(gm)
    _same(before, _snapshot(gm))
    before_frozen = _snapshot(frozen)
    integer = integer_arithmetic(frozen)
    assert integer is not frozen and integer.graph is not frozen.graph
    _same(before_frozen, _snapshot(frozen))
    before_integer = _snapshot(integer)
    export_onnx_model(integer, (torch.zeros((1,) + SHAPE),))
    _same(before_integer, _snapshot(integer))
    assert freeze(gm).code == integer.code
