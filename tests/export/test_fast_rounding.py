"""Weight rounding and bias precision of the fast int8 format (weight_rounding, bn_folding), each
checked against an independent computation: F.conv2d on the data, exact float64 products."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fracfx.export import bn_folding
from fracfx.export.fast_int8 import build_reference
from fracfx.export.weight_rounding import input_moments, output_error, round_with_feedback
from fracfx.nn.frozen import FrozenActQuant, FrozenWeight
from tests.export.helpers import TinyResNet, calibrated, inputs, settle_batchnorm


class _Conv(nn.Module):
    """One quantized-looking conv: a FrozenActQuant then F.conv2d with a FrozenWeight (stride, padding, groups)."""

    def __init__(self, weight: FrozenWeight, groups: int):
        super().__init__()
        self.act = FrozenActQuant(8, torch.tensor(0.05), torch.tensor(100))
        self.weight, self.groups = weight, groups

    def forward(self, x):
        return F.conv2d(self.act(x), self.weight(), None, 2, 1, 1, self.groups)


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, name):  # the frozen quantizers are call_module nodes, as in a frozen model
        return isinstance(m, (FrozenActQuant, FrozenWeight)) or super().is_leaf_module(m, name)


def _trace(module: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(module, _LeafTracer().trace(module))


def _frozen_weight(c_out: int, c_in: int, k: int, bits: int = 8, seed: int = 0) -> FrozenWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (c_out, c_in, k, k), generator=g)
    return FrozenWeight(bits, codes, torch.rand(c_out, generator=g) * 0.02 + 0.005, torch.randint(2**bits // 4, 3 * 2**bits // 4, (c_out,), generator=g))


def _conv_inputs(seed: int = 3) -> torch.Tensor:
    return torch.randn(6, 4, 9, 9, generator=torch.Generator().manual_seed(seed)) + 0.7  # a mean, like post-ReLU maps


@pytest.mark.parametrize("groups", [1, 2])
def test_hessian_gives_the_mean_squared_conv_output(groups):
    weight = _frozen_weight(6, 4 // groups, 3)
    gm = _trace(_Conv(weight, groups))
    x = _conv_inputs()
    conv = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.conv2d)
    moments = input_moments(gm, [conv.name], (x,))[conv.name]
    assert moments.hessian.shape == (groups, 4 // groups * 9, 4 // groups * 9) and moments.mean.shape == (groups, 4 // groups * 9)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64)
    # independent: the conv itself on the quantizer's output, squared (or not) and averaged over samples and positions
    y = F.conv2d(gm.act(x).double(), w, None, 2, 1, 1, groups)
    assert torch.allclose(output_error(w.reshape(6, -1), moments.hessian), (y ** 2).mean(dim=(0, 2, 3)), rtol=1e-5)
    assert torch.allclose(moments.mean_shift(w.reshape(6, -1)), y.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-9)
    assert torch.allclose(output_error(w.reshape(6, -1), moments.covariance), y.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4)


def test_rounding_without_data_is_round_to_nearest_and_with_data_lowers_the_output_error():
    torch.manual_seed(0)
    w = torch.randn(8, 36, dtype=torch.float64) * 10
    assert torch.equal(round_with_feedback(w, 64, None), torch.round(w).clamp(-64, 64))
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(36, 36, generator=g, dtype=torch.float64) / 6 + torch.eye(36, dtype=torch.float64)
    patches = torch.randn(4000, 36, generator=g, dtype=torch.float64) @ mix + 0.5  # correlated inputs with a mean
    hessian = (patches.T @ patches / len(patches))[None]
    fed = round_with_feedback(w, 64, hessian)
    assert torch.equal(fed, torch.round(fed)) and fed.abs().max() <= 64
    # independent: the output change on the patches themselves (per channel it may go either way; in sum it drops)
    err_fed = ((patches @ (fed - w).T) ** 2).mean(dim=0).sum()
    err_nearest = ((patches @ (torch.round(w) - w).T) ** 2).mean(dim=0).sum()
    assert err_fed < 0.85 * err_nearest


def test_fold_with_data_requantizes_to_the_limit_with_less_output_error():
    weight = _frozen_weight(6, 4, 3)
    gm = _trace(_Conv(weight, 1))
    x = _conv_inputs()
    conv = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.conv2d)
    moments = input_moments(gm, [conv.name], (x,))[conv.name]
    bias = torch.randn(6)
    plain = bn_folding.fold(weight, bias, None, limit=64)
    fed = bn_folding.fold(weight, bias, None, limit=64, moments=moments)
    assert fed.requantized == plain.requantized == 6 and fed.values.abs().max() <= 64
    assert torch.equal(plain.bias, bias.double())  # no data, no correction
    xq = gm.act(x).double()

    def out_change(folded):  # independent: conv of the data with the folded weight and bias minus the frozen conv
        w = folded.values.double() * folded.scale.double().view(-1, 1, 1, 1)
        return F.conv2d(xq, w, folded.bias, 2, 1) - F.conv2d(xq, weight().double(), bias.double(), 2, 1)

    assert (out_change(fed) ** 2).mean() < 0.85 * (out_change(plain) ** 2).mean()
    # bias correction: on the calibration data the output's mean per channel does not move (up to
    # the float32 weight scales, 1e-7 relative)
    shift_fed, shift_plain = (out_change(f).mean(dim=(0, 2, 3)).abs().max() for f in (fed, plain))
    assert shift_fed < 1e-6 and shift_fed < 1e-4 * shift_plain


def test_finer_bias_unit_keeps_the_real_weights_and_shrinks_the_bias_error():
    weight = _frozen_weight(5, 3, 3, bits=4)
    bias = torch.randn(5) * 3
    folded = bn_folding.fold(weight, bias, None, limit=64)
    finer = bn_folding.finer_bias_unit(folded, 64, 0.05)
    factor = folded.scale.double() / finer.scale.double()
    assert torch.equal(factor, 2 ** torch.round(torch.log2(factor)))  # powers of two: the scale division is exact
    assert torch.equal(finer.values.double() * finer.scale.double().view(-1, 1, 1, 1),
                       folded.values.double() * folded.scale.double().view(-1, 1, 1, 1))
    assert finer.values.abs().max() <= 64 and (finer.values.abs().reshape(5, -1).amax(1) * 2 > 64).all()
    for f in (folded, finer):  # the int32 bias is off by at most half of its (now finer) unit
        unit = torch.tensor(0.05, dtype=torch.float32).double() * f.scale.double()
        assert ((bn_folding.int32_bias(f.bias, 0.05, f.scale) * unit - f.bias).abs() <= unit / 2 + 1e-12).all()
    assert (factor >= 4).all()  # |v| <= 15 -> x4 under 64


def test_four_bit_model_without_new_grids_matches_the_frozen_model(tmp_path):
    # faithful format, 4-bit weights: every rounding is one the trained model has, so with a fine
    # enough bias unit the reference reproduces the frozen model's top-1 on every input
    torch.manual_seed(0)
    gm = calibrated(settle_batchnorm(TinyResNet(), (3, 12, 12)), (3, 12, 12), 4)
    reference, stats, frozen = build_reference(gm, example_inputs=torch.zeros(1, 3, 12, 12), float_branches=True)
    x = inputs(256, (3, 12, 12), seed=5)
    with torch.no_grad():
        want, got = frozen(x), reference(x)
    assert stats.new_grids == 0
    assert (want.argmax(1) == got.argmax(1)).float().mean() >= 0.996
    assert ((got - want).abs().amax(1) / want.abs().amax(1)).median() < 1e-4


def test_rounding_survives_inputs_that_never_vary():
    # a depthwise 3x3 conv after ReLU6: positions that are always padding or always saturated have
    # zero variance (round-off can make it slightly negative), two positions always move together
    g = torch.Generator().manual_seed(2)
    patches = torch.randn(500, 9, generator=g, dtype=torch.float64)
    patches[:, 0] = 0.0  # padding
    patches[:, 1] = 6.0  # saturated
    patches[:, 2] = patches[:, 3]  # duplicated
    cov = torch.cov(patches.T)[None]
    cov[0, 1, 1] = -1e-18
    w = torch.randn(16, 9, generator=g, dtype=torch.float64) * 15  # inside the limit: rounding, not clipping
    fed = round_with_feedback(w, 64, cov)
    assert torch.equal(fed, torch.round(fed)) and fed.abs().max() <= 64
    assert torch.equal(fed[:, :2], torch.round(w[:, :2]).clamp(-64, 64))  # no variance: rounded on their own
    centered = patches - patches.mean(0)  # independent: the output's variance on the patches themselves
    assert ((centered @ (fed - w).T) ** 2).mean() < ((centered @ (torch.round(w).clamp(-64, 64) - w).T) ** 2).mean()


def test_moments_of_saturated_inputs_give_a_rounding_that_factors():
    # post-ReLU6 maps mostly at 6.0: E[x x^T] - mu mu^T from float32 products cancels to noise;
    # the moments must still give a covariance the rounding can factor (depthwise, K = 9 per group)
    g = torch.Generator().manual_seed(4)
    x = torch.full((8, 6, 9, 9), 6.0)
    x[:, :, ::4, ::4] -= torch.rand(8, 6, 3, 3, generator=g) * 0.3  # a few positions move a little
    weight = _frozen_weight(6, 1, 3, seed=5)

    class Depthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = FrozenActQuant(8, torch.tensor(6.0 / 255), torch.tensor(0))
            self.weight = weight

        def forward(self, x):
            return F.conv2d(self.act(x), self.weight(), None, 1, 1, 1, 6)

    gm = _trace(Depthwise())
    conv = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.conv2d)
    moments = input_moments(gm, [conv.name], (x,))[conv.name]
    assert (torch.diagonal(moments.covariance, dim1=1, dim2=2) >= -1e-12).all()
    fed = bn_folding.fold(weight, None, None, limit=64, moments=moments)
    assert fed.values.abs().max() <= 64
    xq = gm.act(x).double()  # independent: the bias correction holds on the data
    w = fed.values.double() * fed.scale.double().view(-1, 1, 1, 1)
    change = F.conv2d(xq, w, fed.bias, 1, 1, 1, 6) - F.conv2d(xq, weight().double(), None, 1, 1, 1, 6)
    assert change.mean(dim=(0, 2, 3)).abs().max() < 1e-5
