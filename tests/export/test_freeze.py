"""freeze / freeze_precision / integer_arithmetic: purity, graph shape, numerics, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fracfx
from fracfx.errors import ExportError
from fracfx.export import freeze, freeze_deviation
from fracfx.nn.frozen import FrozenActQuant, FrozenAffine, FrozenWeight, integer_grid, quantize_codes
from fracfx.meta import FROZEN, Inserted, set_inserted
from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant
from fracfx.export.pipeline import partial_sum_bound
from tests.export.helpers import TinyResNet, calibrated, inputs, settle_batchnorm

SHAPE = (3, 16, 16)


@pytest.fixture
def trained():
    return calibrated(settle_batchnorm(TinyResNet(), SHAPE), SHAPE, 4)


def _modules(gm, kind):
    return [m for m in gm.modules() if isinstance(m, kind)]


def test_freeze_leaves_the_input_untouched(trained):
    before = {k: v.clone() for k, v in trained.state_dict().items() if isinstance(v, torch.Tensor)}
    code, training = trained.code, trained.training
    frozen = freeze(trained)
    assert trained.code == code and trained.training == training
    for key, value in trained.state_dict().items():
        if key in before:
            assert torch.equal(before[key], value), key
    shared = {id(p) for p in trained.parameters()} & {id(t) for t in list(frozen.parameters()) + list(frozen.buffers())}
    assert not shared  # a snapshot: training gm further cannot move the frozen model


def test_frozen_graph_shape(trained):
    frozen = freeze(trained)
    assert not _modules(frozen, (ActQuant, WeightQuant, GradQuant))
    n_act, n_weight = len(_modules(trained, ActQuant)), len(_modules(trained, WeightQuant))
    assert len(_modules(frozen, FrozenActQuant)) == n_act == 6  # stem, 2 + 2 block convs, projection (fc kept FP32)
    assert len(_modules(frozen, FrozenWeight)) == n_weight == 6
    assert all(m.centered for m in _modules(frozen, (FrozenActQuant, FrozenWeight)))
    assert len(_modules(frozen, FrozenAffine)) == 6 + 6  # one rescale per quantized op, one per BatchNorm
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    quantized_weights = {n.args[0].target for n in trained.graph.nodes if n.op == "call_module" and isinstance(trained.get_submodule(n.target), WeightQuant)}
    attrs = {n.target for n in frozen.graph.nodes if n.op == "get_attr"}
    assert not attrs & quantized_weights  # FP32 master weights are gone from the frozen graph
    records = frozen.meta[FROZEN]
    assert len(records) == 12 and all(r.bits == 4 for r in records)


def test_integer_grid_nudges_lo_by_at_most_half_a_step():
    lo = torch.tensor([-1.0, -0.3, 0.0, -2.5, 0.2, -3.0])
    rng = torch.tensor([2.0, 0.7, 1.0, 2.5, 1.0, 2.0])  # last two: all-positive and all-negative ranges
    scale, zp, extended = integer_grid(lo, rng, 4)
    inside = ~extended
    assert extended.tolist() == [False, False, False, False, True, True]
    assert torch.equal(scale[inside], rng[inside] / 15)  # the training step is kept exactly
    shift = (-zp.float() * scale - lo).abs() / scale
    assert (shift[inside] <= 0.5 + 1e-6).all()
    assert zp.tolist()[4] == 0 and zp.tolist()[5] == 15  # 0 joins the grid at the end of the range
    assert torch.allclose(scale[4:], torch.tensor([1.2 / 15, 3.0 / 15]))


def test_frozen_act_is_the_onnx_formula():
    x = torch.randn(1000) * 3
    module = FrozenActQuant(3, torch.tensor(0.37), torch.tensor(2))
    expected = (np.clip(np.round(x.numpy() / np.float32(0.37)) + 2, 0, 7) - 2) * np.float32(0.37)
    assert np.array_equal(module(x).numpy(), expected.astype(np.float32))
    weight = torch.randn(4, 3, 3, 3)
    scale, zp, _ = integer_grid(*fracfx.nn.quant.channel_range(weight), 4)
    codes = quantize_codes(weight, scale, zp, 4)
    assert codes.min() >= 0 and codes.max() <= 15
    dequantized = FrozenWeight(4, codes, scale, zp)()
    assert ((dequantized - weight).abs() <= scale / 2 + 1e-6).all()  # within half a step of the master weight


def _put_on_grid(gm, bits):
    """Make every range sit on the integer zero-point grid with power-of-two steps."""
    qmax = 2**bits - 1
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, ActQuant):
                m.running_range.fill_(qmax * 2.0**-3)
                m.running_lo.fill_(-3 * 2.0**-3)
        for name, p in gm.named_parameters():
            if p.dim() == 4:
                codes = torch.randint(0, qmax + 1, p.shape)
                flat = codes.view(p.shape[0], -1)
                flat[:, 0], flat[:, 1] = 0, qmax  # full range in every channel
                zp = torch.randint(1, qmax, (p.shape[0], 1, 1, 1))
                p.copy_((codes - zp).float() * 2.0**-5)


@pytest.mark.parametrize("bits", [3, 8])
def test_on_grid_freeze_is_exact(trained, bits):
    """Where lo is already on the integer grid freezing changes nothing, bit for bit."""
    fracfx.set_bits(trained, act_bits=bits, weight_bits=bits)
    _put_on_grid(trained, bits)
    x = inputs(32, SHAPE)
    trained.eval()
    with torch.no_grad():
        reference = trained(x)
        plain = freeze(trained, arithmetic="dequantized")(x)
        integer = freeze(trained)(x)
    assert torch.equal(plain, reference)
    rel = ((integer - reference).abs().amax(1) / reference.abs().amax(1)).max()
    assert rel < 1e-5  # only float reassociation (rescale after the op, BatchNorm as x * a + c)
    assert all(r.max_shift_steps == 0 for r in freeze(trained).meta[FROZEN])


def test_integer_and_dequantized_forms_agree(trained):
    x = inputs(32, SHAPE)
    with torch.no_grad():
        a = freeze(trained, arithmetic="dequantized")(x)
        b = freeze(trained)(x)
    assert ((a - b).abs().amax(1) / a.abs().amax(1)).max() < 1e-3
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_partial_sums_of_small_layers_are_exact(trained):
    bounds = partial_sum_bound(freeze(trained))
    assert len(bounds) == 6 and max(bounds.values()) < 1.0  # 4-bit codes, <= 144 terms: far below 2^24


def test_explicit_bits_override_without_touching_gm(trained):
    frozen = freeze(trained, bits=(3, 5))
    assert {m.bits for m in _modules(frozen, FrozenActQuant)} == {3}
    assert {m.bits for m in _modules(frozen, FrozenWeight)} == {5}
    assert {m.current_bits for m in _modules(trained, ActQuant)} == {4}


def test_fp32_bits_drop_the_quantizer(trained):
    frozen = freeze(trained, bits=(0, 4))
    assert not _modules(frozen, FrozenActQuant) and len(_modules(frozen, FrozenWeight)) == 6
    assert not any(m.centered for m in _modules(frozen, FrozenWeight))  # FP32 activations: dequantized form


def test_uncalibrated_model_is_refused_with_the_way_out():
    gm = fracfx.transform(TinyResNet(), example_inputs=torch.zeros((1,) + SHAPE))
    with pytest.raises(ExportError, match=r"stem.*never ran in training mode.*calibrate"):
        freeze(gm)


def test_plain_module_is_refused():
    with pytest.raises(ExportError, match="fracfx.transform"):
        freeze(TinyResNet())


def test_unknown_inserted_role_still_used_is_an_error(trained):
    node = next(n for n in trained.graph.nodes if n.op == "call_function" and "relu" in str(n.target))
    set_inserted(node, Inserted(role="gate_step", serves="layer1"))
    with pytest.raises(ExportError, match=rf"{node.name}.*gate_step.*no freezer"):
        freeze(trained)


def test_freeze_deviation_reports_the_grid_move(trained):
    x = inputs(64, SHAPE)
    trained.train()
    deviation = freeze_deviation(trained, freeze(trained), x)
    assert deviation.samples == 64 and 0 < deviation.max_rel_error < 1
    assert trained.training and all(m.training for m in trained.modules())  # modes restored


def test_dfq_model_freezes_at_explicit_bits_and_drops_its_gates(tmp_path):
    from fracfx.config import DFQConfig
    from fracfx.export import calibrate, export_onnx

    config = DFQConfig(candidates=((3, 6), (4, 8), "skip", "fp32"))
    gm = fracfx.transform(settle_batchnorm(TinyResNet(), SHAPE), config, example_inputs=torch.zeros((2,) + SHAPE))
    calibrate(gm, [inputs(16, SHAPE, seed=s) for s in range(3)])
    with pytest.raises(ExportError, match=r"layer1_conv1.*MixedActQuant.*bits=\(act_bits, weight_bits\)"):
        freeze(gm)
    frozen = freeze(gm, bits=(4, 4))
    leftovers = [n.target for n in frozen.graph.nodes if n.op == "call_module" and str(n.target).startswith("fracfx_gate")]
    assert not leftovers  # gates, fp32 rows and skip mixes are gone
    assert {m.bits for m in _modules(frozen, FrozenActQuant)} == {4} and len(_modules(frozen, FrozenActQuant)) == 5  # stem kept FP32
    report = export_onnx(frozen, tmp_path / "dfq.onnx", torch.zeros((1,) + SHAPE), verify=True, verify_inputs=inputs(32, SHAPE))
    assert report.verify.level("disable_all").max_rel_error < 1e-4
