"""The fused quantizer kernels against the eager torch formulas, and the counter-based noise.

Deterministic paths must be bit-identical to the eager code; stochastic ones bit-identical given the
same noise; the noise identical in C++ and in plain torch, for any thread count, and restored from
a checkpoint by the counter.
"""

import os
import subprocess
import sys

import pytest
import torch

from fracfx.nn import kernels, quant
from fracfx.nn.kernels import philox
from fracfx.nn.quant import fake_quant_scaled, qmax_of, rounding_noise, scale_of
from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant

BITS = (1, 3, 4, 6, 8, 12, 16)

pytestmark = pytest.mark.skipif(not kernels.load(), reason=f"fused kernels unavailable: {kernels.unavailable_reason()}")
ops = torch.ops.fracfx if kernels.load() else None


@pytest.fixture
def eager(monkeypatch):
    """Run the quantizers on their eager torch code inside the test body."""

    def switch(on: bool):
        monkeypatch.setattr(quant, "_fused", not on)

    return switch


def _x(shape, seed=0, scale=3.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale + 0.7


def _counter(value):
    return torch.tensor(value, dtype=torch.int64)


# --- Philox ------------------------------------------------------------------------------------


def test_philox_known_answers():
    """Random123's published Philox4x32-10 test vectors (kat_vectors)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, want in cases:
        words = philox.philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
        assert tuple(int(w) for w in words) == want


@pytest.mark.parametrize("numel", [1, 7, 8, 127, 128, 129, 1000, 65537])
@pytest.mark.parametrize("seed,counter", [(0, 0), (123, 5), (2**40 + 3, 2**33 + 1), (-7, 11)])
def test_kernel_noise_equals_torch_philox(numel, seed, counter):
    got = ops.rounding_noise(numel, _counter(counter), seed)
    want = philox.rounding_noise(numel, _counter(counter), seed)
    assert torch.equal(got, want)


def test_noise_streams_differ_by_seed_counter_and_element():
    a = rounding_noise((4096,), _counter(0), 1)
    assert not torch.equal(a, rounding_noise((4096,), _counter(1), 1))
    assert not torch.equal(a, rounding_noise((4096,), _counter(0), 2))
    assert len(torch.unique(a)) > 3500  # distinct elements get distinct draws
    # a prefix of a longer draw is the shorter draw: the noise depends on the element index only
    assert torch.equal(a[:1000], rounding_noise((1000,), _counter(0), 1))


def test_noise_is_unbiased_uniform_with_16_bit_resolution():
    u = rounding_noise((1 << 22,), _counter(3), 99).double()
    assert -0.5 < u.min() and u.max() < 0.5
    k = u * 65536 - 0.5  # integers in [-32768, 32767]
    assert torch.equal(k, k.round())
    assert len(torch.unique(k)) == 65536, "every 16-bit level is reachable"
    assert abs(u.mean().item()) < 1e-3  # sd of the mean: 0.29 / 2048 = 1.4e-4
    assert u.var().item() == pytest.approx(1 / 12, rel=5e-3)
    counts = torch.histc(u, bins=16, min=-0.5, max=0.5)
    assert (counts / counts.mean() - 1).abs().max() < 0.02


# --- kernels vs eager formulas ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (5, 3, 7), (128, 16, 8, 8), (3, 100003)])
@pytest.mark.parametrize("bits", BITS)
def test_per_tensor_kernel_is_bit_exact(shape, bits):
    x = _x(shape, seed=bits)
    lo, hi = torch.aminmax(x)
    klo, khi = ops.minmax(x)
    assert torch.equal(lo, klo) and torch.equal(hi, khi)
    qmax = qmax_of(bits)
    s = scale_of(hi - lo, qmax)
    assert torch.equal(ops.fake_quant(x, lo, s, float(qmax)), fake_quant_scaled(x, lo, s, qmax))
    noise = philox.rounding_noise(x.numel(), _counter(4), 77).view(shape)
    assert torch.equal(ops.fake_quant(x, lo, s, float(qmax), None, _counter(4), 77), fake_quant_scaled(x, lo, s, qmax, noise))


@pytest.mark.parametrize("bits", BITS)
def test_per_row_kernel_is_bit_exact_with_fp32_rows(bits):
    x = _x((16, 3, 5, 5), seed=bits)
    rows = x.reshape(16, -1)
    lo, hi = ops.row_minmax(x, 16)
    assert torch.equal(lo, rows.amin(1)) and torch.equal(hi, rows.amax(1))
    qmax = torch.tensor([qmax_of(bits), 0, 7, qmax_of(bits)] * 4)
    safe = torch.where(qmax == 0, torch.ones_like(qmax), qmax).float()
    s = scale_of(hi - lo, safe)
    bshape = (16, 1, 1, 1)
    noise = philox.rounding_noise(x.numel(), _counter(9), 5).view(x.shape)
    for counter, n in ((None, None), (_counter(9), noise)):
        want = torch.where((qmax == 0).view(bshape), x, fake_quant_scaled(x, lo.view(bshape), s.view(bshape), safe.view(bshape), n))
        got = ops.fake_quant(x, lo, s, 0.0, qmax.float(), counter, 5)
        assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(4, 16, 32, 32), (3, 5, 7, 9), (2, 64, 8, 8), (5, 1, 4, 4), (2, 3, 1, 1)])
def test_channels_last_input_gives_the_contiguous_result_in_its_own_layout(shape):
    """torch.compile hands the gradient quantizer channels-last gradients (fake_quant is flexible_layout):
    each element still gets the noise of its logical (NCHW row-major) index, for any thread count."""
    x = _x(shape, seed=3)
    lo, hi = torch.aminmax(x)
    s = scale_of(hi - lo, 255)
    cl = x.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for counter in (None, _counter(6)):
                want = ops.fake_quant(x, lo, s, 255.0, None, counter, 21)
                got = ops.fake_quant(cl, lo, s, 255.0, None, counter, 21)
                assert torch.equal(got, want)
                assert got.is_contiguous(memory_format=torch.channels_last)
            # per-row grids on a channels-last tensor (through a contiguous copy)
            rows = torch.tensor([255.0, 0.0] * shape[0])[: shape[0]]
            got = ops.fake_quant(cl, lo.expand(shape[0]).contiguous(), s.expand(shape[0]).contiguous(), 0.0, rows, _counter(2), 4)
            assert torch.equal(got, ops.fake_quant(x, lo.expand(shape[0]).contiguous(), s.expand(shape[0]).contiguous(), 0.0, rows, _counter(2), 4))
    finally:
        torch.set_num_threads(threads)
    # any other layout: the contiguous result, contiguous
    permuted = x.permute(0, 2, 1, 3)
    got = ops.fake_quant(permuted, lo, s, 255.0, None, _counter(6), 21)
    assert got.is_contiguous() and torch.equal(got, ops.fake_quant(permuted.contiguous(), lo, s, 255.0, None, _counter(6), 21))


def test_fake_quant_fake_states_the_kernels_output_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    lo, s = torch.zeros(1), torch.full((1,), 0.1)
    for x in (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), torch.randn(2, 3, 4, 5)[:, :, ::2],
              torch.randn(2, 1, 4, 4).contiguous(memory_format=torch.channels_last), torch.randn(6, 5).t()):
        real = ops.fake_quant(x, lo, s, 255.0, None, _counter(1), 0)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = ops.fake_quant(mode.from_tensor(x), mode.from_tensor(lo), mode.from_tensor(s), 255.0, None, mode.from_tensor(_counter(1)), 0)
        assert fake.stride() == real.stride(), x.stride()


def test_degenerate_inputs_follow_the_eager_code():
    for x in (torch.zeros(100), torch.full((3, 50), 2.5), torch.tensor([1.0, float("nan"), 3.0])):
        lo, hi = torch.aminmax(x)
        klo, khi = ops.minmax(x)
        assert torch.equal(lo, klo, ) or (lo.isnan() and klo.isnan())
        s = scale_of(hi - lo, 255)
        assert torch.allclose(ops.fake_quant(x, lo, s, 255.0), fake_quant_scaled(x, lo, s, 255), equal_nan=True, rtol=0, atol=0)


def _grad_through(module, g, *extra):
    y = torch.zeros_like(g, requires_grad=True)
    module(y, *extra).backward(g)
    return y.grad


def _quantizer_outputs(seed=0):
    """Every quantizer's output on one input: act (train, eval), weight, grad (per tensor, DFQ)."""
    torch.manual_seed(seed)
    from fracfx.nn.gates import CandidateTable
    from fracfx.nn.mixed import MixedActQuant, MixedGradQuant

    x = _x((64, 16, 16, 16), seed=seed)
    w = _x((32, 16, 3, 3), seed=seed + 1)
    g = _x((64, 16, 16, 16), seed=seed + 2, scale=1e-3)
    out = {}
    for bits in (3, 8):
        act = ActQuant(bits).train()
        out[f"act{bits}"] = act(x)
        out[f"act{bits}_eval"] = act.eval()(x * 2)
        out[f"weight{bits}"] = WeightQuant(bits)(w)
        grad = GradQuant(bits, seed=11)
        out[f"grad{bits}"] = _grad_through(grad, g)
        out[f"grad{bits}_next"] = _grad_through(grad, g)  # the counter moved: new noise
        out[f"grad{bits}_nearest"] = _grad_through(GradQuant(bits, stochastic=False), g)
    table = CandidateTable(((3, 6), (4, 8), (4, 6), (6, 12), "fp32", "skip"))
    mask = torch.nn.functional.one_hot(torch.arange(64) % 6, 6).float()
    out["mixed_act"] = MixedActQuant(table).train()(x, mask)
    mixed_grad = MixedGradQuant(table, seed=5)
    out["mixed_grad"] = _grad_through(mixed_grad, g, mask)
    return out


def test_every_quantizer_is_bit_identical_to_its_eager_code(eager):
    fused = _quantizer_outputs()
    eager(True)
    reference = _quantizer_outputs()
    for name, value in fused.items():
        assert torch.equal(value, reference[name]), name
    assert not torch.equal(fused["grad8"], fused["grad8_next"])


def test_every_quantizer_is_thread_count_invariant():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _quantizer_outputs(seed=3)
        torch.set_num_threads(2)
        two = _quantizer_outputs(seed=3)
    finally:
        torch.set_num_threads(threads)
    for name, value in one.items():
        assert torch.equal(value, two[name]), name


def test_gradient_quantizer_is_unbiased_and_exact_given_the_noise():
    g = _x((4, 64), seed=7)
    g[0, :8] = 0.0
    quant_ = GradQuant(4, seed=2)
    draws = []
    for call in range(2000):
        got = _grad_through(quant_, g)
        if call < 3:  # the formula with this call's noise, bit for bit
            lo, hi = torch.aminmax(g)
            noise = rounding_noise(g.shape, _counter(call), 2)
            assert torch.equal(got, fake_quant_scaled(g, lo, scale_of(hi - lo, 15), 15, noise))
        draws.append(got)
    draws = torch.stack(draws)
    step = (g.max() - g.min()).item() / 15
    assert (draws.mean(0) - g).abs().max().item() < 0.05 * step
    assert (draws[:, 0, :8] != 0).all()


def test_noise_counter_round_trips_through_state_dict():
    g = _x((8, 5, 6, 6), seed=8)
    a = GradQuant(4, seed=11)
    for _ in range(3):
        _grad_through(a, g)
    state = a.state_dict()
    assert int(state["noise_counter"]) == 3 and state["_extra_state"] == {"seed": 11}
    b = GradQuant(4, seed=99)
    b.load_state_dict(state)
    assert b.noise_seed == 11 and int(b.noise_counter) == 3
    assert torch.equal(_grad_through(a, g), _grad_through(b, g))
    a.seed(11)
    assert int(a.noise_counter) == 0


def test_old_generator_checkpoints_still_load():
    a = GradQuant(4, seed=3)
    old = {"bits": a.bits.clone(), "_extra_state": {"device": "cpu", "state": torch.Generator().get_state()}}
    with pytest.warns(RuntimeWarning, match="counter based"):
        a.load_state_dict(old)
    assert a.noise_seed == 3 and int(a.noise_counter) == 0


def test_eval_and_no_grad_do_not_advance_the_counter():
    quant_ = GradQuant(8)
    quant_(torch.zeros(3))
    with torch.no_grad():
        quant_(torch.zeros(3, requires_grad=True))
    assert int(quant_.noise_counter) == 0


def test_fallback_warns_once_and_matches(tmp_path):
    code = (
        "import warnings, torch\n"
        "from fracfx.nn.quantizers import GradQuant\n"
        "from fracfx.nn import quant\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    GradQuant(8); GradQuant(4)\n"
        "assert not quant.fused_kernels_enabled()\n"
        "print(sum('kernels unavailable' in str(w.message) for w in caught))\n"
    )
    env = dict(os.environ, FRACFX_KERNELS="0")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def _mask_gradient(batch_range: bool, seed=0):
    from fracfx.nn.gates import CandidateTable
    from fracfx.nn.mixed import MixedActQuant

    torch.manual_seed(seed)
    table = CandidateTable(((3, 6), (4, 8), (4, 6), (6, 12), "fp32", "skip"))
    quant_ = MixedActQuant(table).train(batch_range)
    if not batch_range:  # eval: running ranges narrower than x, so the clamp matters
        quant_.running_lo.fill_(-1.0)
        quant_.running_range.fill_(2.0)
    x = _x((24, 8, 9, 9), seed=seed)
    mask = torch.nn.functional.one_hot(torch.arange(24) % 6, 6).float().requires_grad_()
    upstream = _x(x.shape, seed=seed + 1)
    quant_(x, mask).backward(upstream)
    return mask.grad


@pytest.mark.parametrize("batch_range", [True, False])
def test_mixed_mask_gradient_matches_eager_up_to_summation_order(eager, batch_range):
    fused = _mask_gradient(batch_range)
    eager(True)
    reference = _mask_gradient(batch_range)
    assert torch.allclose(fused, reference, rtol=1e-5, atol=1e-3 * reference.abs().max().item() * 1e-3)
    assert torch.equal(fused[:, 5], torch.zeros(24))  # "skip" gets its gradient from SkipMix


def test_mixed_mask_gradient_is_thread_count_invariant():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _mask_gradient(True, seed=4)
        torch.set_num_threads(2)
        two = _mask_gradient(True, seed=4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_narrower_isa_builds_give_the_same_results(isa, tmp_path):
    """The AVX2 and plain C++ variants (built here on purpose) pass this file's exactness tests too."""
    env = dict(os.environ, FRACFX_KERNELS_ISA=isa)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not narrower and not fallback"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"fracfx_kernels_{isa}_" in subprocess.run(
        [sys.executable, "-c", "from fracfx.nn import kernels; print(kernels.build_key()[0])"], capture_output=True, text=True, env=env).stdout
