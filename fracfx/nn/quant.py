"""The FracTrain quantizer (FRACTRAIN.md section 1) as plain functions and autograd functions.

fake_quant:   s = max(R / (2^b - 1), 1e-8); q = round(clamp((x - lo) / s, 0, 2^b - 1)); q * s + lo
stochastic:   the same with uniform noise u in [-0.5, 0.5) added to (x - lo) / s before clamping.

Everything is FP32 and dequantized. `lo`, `rng` and `qmax` broadcast against x, so the same code
serves per-tensor, per-output-channel and (for DFQ) per-sample parameters.
"""

from __future__ import annotations

import torch

MIN_SCALE = 1e-8
_NOISE_STEPS = 65536  # CPU rounding noise has 16-bit resolution (see rounding_noise)


def qmax_of(bits: int) -> int:
    return (1 << bits) - 1


def scale_of(rng: torch.Tensor, qmax) -> torch.Tensor:
    return torch.clamp(rng / qmax, min=MIN_SCALE)


def fake_quant(x: torch.Tensor, lo: torch.Tensor, rng: torch.Tensor, qmax, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Asymmetric fake quantization of x on the grid lo + k * s, k in 0..qmax.

    `qmax` is 2^b - 1, a Python int or a tensor broadcasting against x (per-sample bits).
    With `noise` (same shape as x, values in [-0.5, 0.5)), rounding is stochastic.
    """
    return fake_quant_scaled(x, lo, scale_of(rng, qmax), qmax, noise)


def fake_quant_scaled(x: torch.Tensor, lo: torch.Tensor, s: torch.Tensor, qmax, noise: torch.Tensor | None = None) -> torch.Tensor:
    """fake_quant with the step s given instead of the range (s = scale_of(R, qmax))."""
    v = (x - lo).div_(s)
    if noise is not None:
        v.add_(noise)
    if isinstance(qmax, torch.Tensor):
        # two one-sided clamps: clamp() with tensor bounds on both sides takes a slow
        # non-vectorised path on CPU (~50x slower); the results are identical
        v.clamp_min_(0).clamp_max_(qmax)
    else:
        v.clamp_(0, qmax)
    return v.round_().mul_(s).add_(lo)


def integer_grid(lo: torch.Tensor, rng: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, zero_point, extended): the integer zero-point grid nearest to [lo, lo + rng].

    ONNX DequantizeLinear computes (q - zp) * s with an integer zp, so the grid must be
    -zp * s + k * s. The step s is kept exactly (the training step max(rng / qmax, 1e-8))
    wherever lo <= 0 <= lo + rng, and zp = clamp(round(-lo / s), 0, qmax), moving the grid by at
    most s / 2 (the TensorFlow / PyTorch observer "nudge"). A range that does not contain 0 is
    first widened to include it (`extended` marks those entries; their step grows).
    """
    qmax = qmax_of(bits)
    lo = lo.detach().float()
    rng = rng.detach().float()
    hi = lo + rng
    extended = (lo > 0) | (hi < 0)
    wide_lo = torch.clamp(lo, max=0.0)
    wide_rng = torch.where(extended, torch.clamp(hi, min=0.0) - wide_lo, rng)
    scale = scale_of(wide_rng, qmax)
    zero_point = torch.clamp(torch.round(-wide_lo / scale), 0, qmax).to(torch.int64)
    return scale, zero_point, extended


def grid_of(lo: torch.Tensor, rng: torch.Tensor, bits: int, integer_zero_point: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, s) of the grid the training quantizer uses: FRACTRAIN.md's real-valued lo, or the
    integer zero-point grid that ONNX export reproduces exactly (QuantConfig.integer_zero_point)."""
    if not integer_zero_point:
        return lo, scale_of(rng, qmax_of(bits))
    scale, zero_point, _ = integer_grid(lo, rng, bits)
    return -(zero_point.to(scale.dtype) * scale), scale


def rounding_noise(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform noise in (-0.5, 0.5) for stochastic rounding, drawn from `generator`.

    On CPU, torch.rand costs ~5 ns per element (one Mersenne-Twister draw each), which alone would
    add ~25 % to a ResNet training step. Instead one 64-bit draw is split into four 16-bit
    integers k in [-32768, 32767] and mapped to (k + 0.5) / 65536: exactly symmetric around 0, so
    the rounding stays unbiased, at 1/65536 of a quantization step resolution, ~2.5x faster.
    On other devices torch.rand (Philox, already fast) is used.
    """
    shape = tuple(shape)
    numel = 1
    for d in shape:
        numel *= d
    if device.type != "cpu":
        return torch.rand(shape, generator=generator, device=device).sub_(0.5)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    k = words.view(torch.int16)[:numel]
    return k.float().add_(0.5).mul_(1.0 / _NOISE_STEPS).view(shape)


def tensor_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (lo, R) = (min, max - min), detached."""
    lo, hi = torch.aminmax(x.detach())
    return lo, hi - lo


def _row_min_max(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # amin + amax: torch.aminmax(dim=1) is ~50x slower on CPU for (batch, features) shapes
    return rows.amin(dim=1), rows.amax(dim=1)


def channel_range(w: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (lo, R) along `axis`, shaped to broadcast against w, detached."""
    w = w.detach()
    moved = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    lo, hi = _row_min_max(moved)
    shape = [1] * w.dim()
    shape[axis] = w.shape[axis]
    return lo.view(shape), (hi - lo).view(shape)


class FakeQuantSTE(torch.autograd.Function):
    """fake_quant_scaled in forward, identity in backward (straight-through, no clipping mask)."""

    @staticmethod
    def forward(ctx, x, lo, s, qmax):
        return fake_quant_scaled(x, lo, s, qmax)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class GradQuantFn(torch.autograd.Function):
    """Identity in forward; in backward quantizes dL/dY with stochastic rounding.

    The quantized tensor is what flows on into the op's backward, so both dX and dW are computed
    from the same quantized gradient. `sample_qmax` (B,) gives per-sample bits for DFQ: each
    sample's range is taken over the samples with the same bits only (no leakage between
    groups); entries of 0 leave that sample's gradient in FP32. `sample_group` (B,) ints, if
    given, defines the range groups instead (DFQ: the candidate each sample chose).
    `range_sync` (fracfx.runtime.sync_stats.RangeSync) takes the ranges over every rank of a
    data-parallel run; grouped ranges then need `num_groups` (group ids are 0..num_groups-1).
    """

    @staticmethod
    def forward(ctx, y, qmax, generator, stochastic, sample_qmax, sample_group=None, copy_output=True, range_sync=None, num_groups=None):
        ctx.qmax, ctx.generator, ctx.stochastic, ctx.sample_qmax = qmax, generator, stochastic, sample_qmax
        ctx.sample_group, ctx.range_sync, ctx.num_groups = sample_group, range_sync, num_groups
        # Autograd refuses in-place writes (conv -> ReLU(inplace=True)) on a view made inside a
        # Function, so such consumers get a copy; insert_quant knows the consumers and turns the
        # copy off when none writes in place (saves one pass over every output).
        return y.clone() if copy_output else y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        noise = rounding_noise(grad.shape, ctx.generator, grad.device) if ctx.stochastic else None
        if ctx.sample_qmax is None:
            lo, rng = tensor_range(grad) if ctx.range_sync is None else ctx.range_sync.tensor_range(grad)
            out = fake_quant(grad, lo, rng, ctx.qmax, noise)
        else:
            out = _grouped_quant(grad, ctx.sample_qmax, noise, ctx.sample_group, ctx.range_sync, ctx.num_groups)
        return out, None, None, None, None, None, None, None, None


def _grouped_quant(grad: torch.Tensor, sample_qmax: torch.Tensor, noise, groups: torch.Tensor | None = None,
                   range_sync=None, num_groups: int | None = None) -> torch.Tensor:
    """Quantize each sample at its own qmax, with (lo, R) pooled over its group's samples only.

    Groups are the samples sharing a qmax, or the given (B,) `groups` ids (samples in one group
    must share a qmax). A sample's grid therefore depends on its own group's gradients alone.
    With `range_sync`, a group's range spans its samples on every rank (ids 0..num_groups-1).
    """
    batch = grad.shape[0]
    flat = grad.detach().reshape(batch, -1)
    sample_lo, sample_hi = _row_min_max(flat)
    if range_sync is None:
        ids = torch.unique(sample_qmax if groups is None else groups, return_inverse=True)[1]
        lo = torch.full_like(sample_lo, float("inf")).scatter_reduce(0, ids, sample_lo, "amin", include_self=False)[ids]
        hi = torch.full_like(sample_hi, float("-inf")).scatter_reduce(0, ids, sample_hi, "amax", include_self=False)[ids]
    else:
        if groups is None or num_groups is None:
            raise ValueError("ranges synchronised across ranks need explicit group ids and num_groups (the same on every rank)")
        group_lo = sample_lo.new_full((num_groups,), float("inf")).scatter_reduce(0, groups, sample_lo, "amin")
        group_hi = sample_hi.new_full((num_groups,), float("-inf")).scatter_reduce(0, groups, sample_hi, "amax")
        group_lo, group_hi = range_sync.group_min_max(group_lo, group_hi)
        lo, hi = group_lo[groups], group_hi[groups]
    bshape = (batch,) + (1,) * (grad.dim() - 1)
    qmax = sample_qmax.to(grad.dtype).view(bshape)
    fp32 = (sample_qmax == 0).view(bshape)
    if not bool(fp32.any()):  # the common case: skip two full passes of torch.where
        return fake_quant(grad, lo.view(bshape), (hi - lo).view(bshape), qmax, noise)
    safe_qmax = torch.where(fp32, torch.ones_like(qmax), qmax)
    out = fake_quant(grad, lo.view(bshape), (hi - lo).view(bshape), safe_qmax, noise)
    return torch.where(fp32, grad, out)
