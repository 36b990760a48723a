"""Training on the integer zero-point grid makes the frozen (exported) model compute what was trained."""

import torch

import fracfx
from fracfx.models import build_model
from fracfx.nn.quant import grid_of, integer_grid, scale_of


def test_grid_of_real_mode_is_the_paper_formula_and_integer_mode_is_on_the_onnx_grid():
    lo, rng = torch.tensor(-0.37), torch.tensor(2.5)
    real_lo, real_step = grid_of(lo, rng, 4, integer_zero_point=False)
    assert real_lo is lo and torch.equal(real_step, scale_of(rng, 15))
    int_lo, int_step = grid_of(lo, rng, 4, integer_zero_point=True)
    scale, zp, extended = integer_grid(lo, rng, 4)
    assert torch.equal(int_step, real_step) and not extended  # the step is kept
    assert torch.equal(int_lo, -(zp.float() * scale))
    assert abs(int_lo - lo) <= real_step / 2 + 1e-7


def _trained_like(integer_zero_point: bool):
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", in_channels=1)
    config = fracfx.QuantConfig(act_bits=4, weight_bits=4, grad_bits=8, integer_zero_point=integer_zero_point)
    gm = fracfx.transform(model, config)
    gm.train()
    with torch.no_grad():
        for _ in range(8):  # settle BN and the running activation ranges
            gm(torch.randn(32, 1, 16, 16))
    return gm.eval()


def test_freeze_is_near_exact_only_on_the_integer_grid():
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    errors = {}
    for integer in (False, True):
        gm = _trained_like(integer)
        with torch.no_grad():
            reference = gm(x)
            frozen = fracfx.freeze(gm)(x)
        errors[integer] = ((frozen - reference).abs().max() / reference.abs().max()).item()
    # the integer grid differs from freeze's only by float rounding order (rare one-step flips)
    assert errors[True] < 1e-3, errors
    assert errors[True] * 10 < errors[False], errors
