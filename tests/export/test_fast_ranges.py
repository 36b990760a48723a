"""New 8-bit grids narrowed to where a residual branch can change the output (fracfx.export.int8_ranges):
the interval from the grids the reference writes, and the clipping checked to change no quantized output."""

from __future__ import annotations

import torch

from fracfx.export.fast_int8 import BN_SIGMAS, _frozen_dequantized, build_reference
from fracfx.export.int8_ops import QConv
from fracfx.export.int8_plan import batchnorm_ranges, new_points
from fracfx.export.int8_ranges import narrow
from tests.export.helpers import TinyResNet, calibrated, settle_batchnorm

SHAPE = (3, 12, 12)


def _frozen(bits: int):
    torch.manual_seed(0)
    gm = calibrated(settle_batchnorm(TinyResNet(), SHAPE), SHAPE, bits)
    return gm, _frozen_dequantized(gm)


def test_identity_shortcut_branch_is_cut_to_the_readers_grids_and_the_clip_changes_nothing():
    gm, frozen = _frozen(6)
    points = new_points(frozen)
    wide = batchnorm_ranges(frozen, points, sigmas=BN_SIGMAS)
    cut = narrow(frozen, wide)
    # independent: the shortcut s is the stem's output as the reference writes it (a new grid after the ReLU) ...
    reference, _, _ = build_reference(gm, example_inputs=torch.zeros((1,) + SHAPE))
    stem = next(op for op in reference.ops if isinstance(op, QConv) and op.out == "relu")
    s_lo, s_hi = (stem.lo - stem.y_zp) * stem.y_scale, (stem.hi - stem.y_zp) * stem.y_scale
    # ... and relu(r + s) is read only by layer2's two activation quantizers, which clamp at their grids' tops
    readers = [frozen.fracfx_quant.layer2_conv1.act, frozen.fracfx_quant.layer2_short_0.act]
    top = max((q.qmax - int(q.zero_point)) * float(q.scale) for q in readers)
    lo, hi = wide["layer1_bn2"]
    assert cut["layer1_bn2"] == (max(lo, 0.0 - s_hi), min(hi, top - s_lo))
    assert cut["layer1_bn2"][1] < hi  # a 6-bit reader's grid ends well inside the BatchNorm's 6 sigma
    g = torch.Generator().manual_seed(0)
    r = torch.empty(200_000).uniform_(3 * lo, 3 * hi, generator=g)
    s = torch.empty(200_000).uniform_(s_lo, s_hi, generator=g)
    clipped = r.clamp(*cut["layer1_bn2"])
    for q in readers:
        assert torch.equal(q(torch.relu(r + s)), q(torch.relu(clipped + s)))


def test_branches_without_a_bounded_partner_or_reader_keep_their_range():
    _, frozen = _frozen(8)
    points = new_points(frozen)
    wide = batchnorm_ranges(frozen, points, sigmas=BN_SIGMAS)
    cut = narrow(frozen, wide)
    # layer2's sum goes to average pooling (no quantizer): no upper bound; its partner's grid bounds the lower side
    assert cut["layer2_bn2"][1] == wide["layer2_bn2"][1] and cut["layer2_short_1"][1] == wide["layer2_short_1"][1]
    assert all(cut[p][0] >= wide[p][0] and cut[p][1] <= wide[p][1] for p in points)


def test_the_reference_uses_the_narrowed_grid():
    gm, frozen = _frozen(6)
    cut = narrow(frozen, batchnorm_ranges(frozen, new_points(frozen), sigmas=BN_SIGMAS))
    reference, _, _ = build_reference(gm, example_inputs=torch.zeros((1,) + SHAPE))
    op = next(op for op in reference.ops if isinstance(op, QConv) and op.out == "layer1_bn2")
    lo, hi = min(cut["layer1_bn2"][0], 0.0), max(cut["layer1_bn2"][1], 0.0)
    assert abs(op.y_scale - (hi - lo) / 255) < 1e-6 * op.y_scale
