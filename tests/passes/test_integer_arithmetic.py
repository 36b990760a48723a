"""integer_arithmetic: quantized ops on integer codes with one rescale after; same values."""

import torch

import fracfx
from fracfx.export import calibrate
from fracfx.nn.frozen import FrozenActQuant, FrozenAffine, FrozenWeight
from fracfx.passes.freeze_precision import freeze_precision
from fracfx.passes.integer_arithmetic import integer_arithmetic
from tests.passes.conftest import EXAMPLE, ConvNet


def frozen():
    gm = fracfx.transform(ConvNet(), fracfx.QuantConfig(keep_fp32=(), act_bits=6, weight_bits=5), example_inputs=EXAMPLE)
    return freeze_precision(calibrate(gm, [torch.randn(8, 3, 6, 6) for _ in range(3)]))


def test_op_counts_after():
    gm = frozen()
    assert not any(isinstance(m, FrozenAffine) for m in gm.modules())
    out = integer_arithmetic(gm)
    affines = [m for m in out.modules() if isinstance(m, FrozenAffine)]
    assert len(affines) == 3 + 1  # conv, fc, matmul rescales; the eval BatchNorm as an affine
    centered = [m for m in out.modules() if isinstance(m, (FrozenActQuant, FrozenWeight))]
    assert centered and all(m.centered for m in centered)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in out.modules())


def test_numerics_agree_with_the_dequantized_form():
    gm = frozen()
    out = integer_arithmetic(gm)
    x = torch.randn(16, 3, 6, 6)
    expected, got = gm(x), out(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_partial_sum_bound_moved_to_the_export_package_and_the_old_name_warns():
    import importlib

    import pytest

    from fracfx.export.pipeline import partial_sum_bound

    old = importlib.import_module("fracfx.passes.integer_arithmetic")  # the package's attribute is the pass

    with pytest.warns(DeprecationWarning, match="moved to fracfx.export.pipeline"):
        assert old.partial_sum_bound is partial_sum_bound
    assert all(v < 1 for v in partial_sum_bound(integer_arithmetic(frozen())).values())
