"""freeze_precision: quantizers -> frozen quantizers, gradient quantizers gone, eval-only copy."""

import pytest
import torch

import fracfx
from fracfx.errors import ExportError
from fracfx.export import calibrate
from fracfx.meta import FROZEN, is_frozen
from fracfx.nn.frozen import FrozenActQuant, FrozenWeight
from fracfx.nn.quantizers import QUANTIZER_TYPES
from fracfx.passes.freeze_precision import freeze_precision
from tests.passes.conftest import EXAMPLE, ConvNet


@pytest.fixture
def calibrated():
    gm = fracfx.transform(ConvNet(), fracfx.QuantConfig(keep_fp32=(), act_bits=8, weight_bits=8), example_inputs=EXAMPLE)
    return calibrate(gm, [torch.randn(8, 3, 6, 6) for _ in range(3)])


def test_op_counts_after(calibrated):
    assert not is_frozen(calibrated)
    out = freeze_precision(calibrated)
    kinds = [type(out.get_submodule(n.target)) for n in out.graph.nodes if n.op == "call_module"]
    # conv and fc: one activation and one weight quantizer each; matmul: two activations
    assert kinds.count(FrozenActQuant) == 4 and kinds.count(FrozenWeight) == 2
    assert not any(isinstance(m, QUANTIZER_TYPES) for m in out.modules())
    assert is_frozen(out) and len(out.meta[FROZEN]) == 6
    assert not out.training and not any(p.requires_grad for p in out.parameters())


def test_numerics_match_the_unfrozen_eval_model_within_a_step(calibrated):
    out = freeze_precision(calibrated)
    x = torch.randn(4, 3, 6, 6)
    reference = calibrated.eval()(x)
    assert torch.allclose(out(x), reference, atol=0.05 * reference.abs().max().item())


def test_fp32_bits_drop_the_quantizers_and_give_the_float_model(calibrated):
    out = freeze_precision(calibrated, bits=(0, 0))
    assert not any(isinstance(m, (FrozenActQuant, FrozenWeight)) for m in out.modules())
    fracfx.set_bits(calibrated, 0, 0, 0)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(out(x), calibrated.eval()(x))


def test_uncalibrated_quantizers_are_refused(calibrated):
    fresh = fracfx.transform(ConvNet(), fracfx.QuantConfig(keep_fp32=()))
    with pytest.raises(ExportError, match="calibrate"):
        freeze_precision(fresh)
    with pytest.raises(ExportError, match="bits must be"):
        freeze_precision(calibrated, bits=(8,))
