"""The quantizer against an independent NumPy restatement of docs/method.md section 1."""

import numpy as np
import pytest
import torch

from fracfx.errors import ConfigError
from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant
from fracfx.nn.quant import rounding_noise

BITS = (3, 4, 6, 8)


def reference_fq(x, lo, rng, bits, noise=None):
    """docs/method.md section 1, written again in NumPy float32 (round half to even)."""
    x = np.asarray(x, dtype=np.float32)
    lo = np.asarray(lo, dtype=np.float32)
    qmax = np.float32(2**bits - 1)
    s = np.maximum(np.asarray(rng, dtype=np.float32) / qmax, np.float32(1e-8))
    v = (x - lo) / s
    if noise is not None:
        v = v + np.asarray(noise, dtype=np.float32)
    q = np.round(np.clip(v, np.float32(0), qmax))
    return (q * s + lo).astype(np.float32)


def _sample(shape=(8, 5, 6, 6), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3 + 0.7


@pytest.mark.parametrize("bits", BITS)
def test_activation_train_mode_matches_formula_bit_exact(bits):
    x = _sample()
    quant = ActQuant(bits).train()
    got = quant(x).numpy()
    xn = x.numpy()
    want = reference_fq(xn, xn.min(), xn.max() - xn.min(), bits)
    assert np.array_equal(got, want)
    assert len(np.unique(got)) <= 2**bits


@pytest.mark.parametrize("bits", BITS)
def test_activation_eval_mode_uses_running_stats_and_clamps(bits):
    quant = ActQuant(bits, momentum=0.9).train()
    batches = [_sample(seed=s) for s in range(3)]
    lo_ref, rng_ref = np.float32(0), np.float32(0)
    for batch in batches:
        quant(batch)
        b = batch.numpy()
        lo_ref = np.float32(0.9) * lo_ref + np.float32(0.1) * b.min()
        rng_ref = np.float32(0.9) * rng_ref + np.float32(0.1) * (b.max() - b.min())
    assert quant.running_lo.item() == pytest.approx(float(lo_ref), rel=1e-6)
    assert quant.running_range.item() == pytest.approx(float(rng_ref), rel=1e-6)
    quant.eval()
    x = _sample(seed=9) * 4  # wider than the running range, so clamping matters
    got = quant(x).numpy()
    want = reference_fq(x.numpy(), quant.running_lo.numpy(), quant.running_range.numpy(), bits)
    assert np.array_equal(got, want)
    lo, hi = quant.running_lo.item(), quant.running_lo.item() + quant.running_range.item()
    assert got.min() >= lo - 1e-6 and got.max() <= hi + 1e-5
    before = quant.running_lo.clone()
    quant(x)
    assert torch.equal(before, quant.running_lo), "eval must not move running stats"


@pytest.mark.parametrize("bits", BITS)
def test_weight_per_output_channel_matches_formula_bit_exact(bits):
    w = _sample((6, 4, 3, 3), seed=3)
    got = WeightQuant(bits)(w).numpy()
    wn = w.numpy().reshape(6, -1)
    want = np.stack([reference_fq(row, row.min(), row.max() - row.min(), bits) for row in wn]).reshape(w.shape)
    assert np.array_equal(got, want)


def test_straight_through_estimator_passes_gradient_unchanged():
    x = _sample().requires_grad_()
    upstream = torch.randn_like(x)
    ActQuant(3).train()(x).backward(upstream)
    assert torch.equal(x.grad, upstream)
    w = _sample((4, 3, 3, 3)).requires_grad_()
    WeightQuant(3)(w).backward(upstream[:4, :3, :3, :3])
    assert torch.equal(w.grad, upstream[:4, :3, :3, :3])


def test_fp32_bits_are_identity():
    x = _sample()
    for quant in (ActQuant(0), WeightQuant(None), GradQuant(0)):
        assert quant(x) is x


def _grad_through(quant, g):
    y = torch.zeros_like(g, requires_grad=True)
    quant(y).backward(g)
    return y.grad


@pytest.mark.parametrize("bits", BITS)
def test_gradient_quantizer_bit_exact_given_same_noise(bits):
    g = _sample(seed=5) * 1e-3
    quant = GradQuant(bits, seed=123)
    got = _grad_through(quant, g).numpy()
    noise = rounding_noise(g.shape, torch.tensor(0), 123).numpy()  # the first call: counter 0
    gn = g.numpy()
    want = reference_fq(gn, gn.min(), gn.max() - gn.min(), bits, noise)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("bits", BITS)
def test_gradient_levels_and_range(bits):
    g = _sample(seed=6)
    got = _grad_through(GradQuant(bits, seed=1), g)
    lo, hi = g.min().item(), g.max().item()
    step = (hi - lo) / (2**bits - 1)
    levels = torch.unique(got)
    assert len(levels) <= 2**bits
    k = (levels - lo) / step
    assert torch.allclose(k, k.round(), atol=1e-3), "every value lies on lo + k*s"
    assert levels.min() >= lo - 1e-5 and levels.max() <= hi + 1e-5


def test_gradient_quantizer_is_unbiased_and_zeros_do_not_survive():
    g = _sample((4, 64), seed=7)
    g[0, :8] = 0.0
    quant = GradQuant(4, seed=2)
    draws = torch.stack([_grad_through(quant, g) for _ in range(2000)])
    step = (g.max() - g.min()).item() / 15
    bias = (draws.mean(0) - g).abs().max().item()
    assert bias < 0.05 * step, f"|E[q] - g| = {bias / step:.4f} steps"
    assert (draws[:, 0, :8] != 0).all(), "an exact zero is not on the grid, so it must not survive"


def test_rounding_noise_is_symmetric_uniform():
    u = rounding_noise((1 << 20,), torch.tensor(0), 0).double()
    assert -0.5 < u.min() and u.max() < 0.5
    assert abs(u.mean().item()) < 2e-3
    assert u.var().item() == pytest.approx(1 / 12, rel=1e-2)


def test_rounding_state_survives_state_dict_round_trip():
    a = GradQuant(4, seed=11)
    g = _sample(seed=8)
    _grad_through(a, g)  # advance the generator
    b = GradQuant(4, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(_grad_through(a, g), _grad_through(b, g))


@pytest.mark.parametrize("bad", [17, -1, 2.5, "8", True])
def test_bits_out_of_range_raise_config_error(bad):
    with pytest.raises(ConfigError, match="bits"):
        ActQuant(bad)
    with pytest.raises(ConfigError):
        GradQuant(8).set_bits(bad)


def test_set_bits_survives_load_state_dict():
    a, b = ActQuant(8), ActQuant(3)
    b.load_state_dict(a.state_dict())
    assert b.current_bits == 8
