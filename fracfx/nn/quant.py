"""The FracTrain quantizer (docs/method.md section 1) as plain functions and autograd functions.

fake_quant:   s = max(R / (2^b - 1), 1e-8); q = round(clamp((x - lo) / s, 0, 2^b - 1)); q * s + lo
stochastic:   the same with uniform noise u in [-0.5, 0.5) added to (x - lo) / s before clamping.

Everything is FP32 and dequantized. `lo`, `rng` and `qmax` broadcast against x, so the same code
serves per-tensor, per-output-channel and (for DFQ) per-sample parameters.

Two implementations of every quantizer, with identical results: the fused C++ kernels of
fracfx.nn.kernels (CPU float32: one pass for the range, one for the quantization, the rounding
noise generated inside it) and the eager torch code here, which is the reference, the path for
other devices and dtypes, and the fallback where the kernels cannot be built (a warning says so
once). The rounding noise is counter based (Philox4x32-10, fracfx/nn/kernels/philox.py): a pure
function of (seed, counter, element index), so it does not depend on threads, chunking or device,
and a checkpoint restores it with the counter. docs/kernels.md has the design.

Under torch.compile the deterministic quantizers are traced as the eager formulas (so inductor
fuses them with the BatchNorm/ReLU around them) and the stochastic one as a single fused op, per
`compile_mode` below; the values stay the eager ones bit for bit (docs/kernels.md, "torch.compile").
"""

from __future__ import annotations

import contextlib

import torch

from fracfx.nn import kernels
from fracfx.nn.kernels import philox

MIN_SCALE = 1e-8
_NOISE_STEPS = philox.NOISE_STEPS  # rounding noise has 16-bit resolution (see rounding_noise)
_fused: bool | None = None  # kernels.available(), read once (kept out of torch.compile's trace)

# What torch.compile traces for the quantizers (docs/kernels.md, "torch.compile"):
#   "fuse"     (default) the deterministic quantizers (ranges, activation and weight fake quant) as
#              the eager torch formulas, which inductor fuses with the BatchNorm/ReLU/add around
#              them; the stochastic gradient quantizer as one fracfx::fake_quant call (its Philox
#              noise generated inside, in whatever memory layout inductor chose), its range as an
#              aminmax that inductor fuses into the kernel producing the gradient
#   "formula"  everything as tensor formulas, the noise materialised by fracfx::rounding_noise
#   "ops"      the fused C++ ops as opaque calls, as in eager mode (the first implementation's only form)
# Every form computes the eager values bit for bit. Read at trace time (dynamo guards on it, so
# changing it recompiles).
COMPILE_MODES = ("fuse", "formula", "ops")
compile_mode = "fuse"


@contextlib.contextmanager
def compiled_as(mode: str | None):
    """Set compile_mode inside the block (None: leave it), for models compiled and run there."""
    global compile_mode
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose from {', '.join(COMPILE_MODES)}")
    previous = compile_mode
    compile_mode = mode or previous
    try:
        yield
    finally:
        compile_mode = previous


def fused_kernels_enabled() -> bool:
    """True if the fused C++ quantizer kernels are in use (builds/loads them on the first call)."""
    global _fused
    if _fused is None:
        _fused = kernels.available()
    return _fused


def _fused_for(x: torch.Tensor) -> bool:
    return (_fused if _fused is not None else fused_kernels_enabled()) and x.device.type == "cpu" and x.dtype == torch.float32


def _traced_formula() -> bool:
    """True while torch.compile traces and compile_mode asks for the tensor formulas."""
    return compile_mode != "ops" and torch.compiler.is_compiling()


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
    """(lo, s) of the grid the training quantizer uses: docs/method.md's real-valued lo, or the
    integer zero-point grid that ONNX export reproduces exactly (QuantConfig.integer_zero_point)."""
    if not integer_zero_point:
        return lo, scale_of(rng, qmax_of(bits))
    scale, zero_point, _ = integer_grid(lo, rng, bits)
    return -(zero_point.to(scale.dtype) * scale), scale


@torch.library.custom_op("fracfx::counter_snapshot", mutates_args=())
def _counter_snapshot(counter: torch.Tensor) -> torch.Tensor:
    return counter.clone()


@_counter_snapshot.register_fake
def _(counter):
    return torch.empty_like(counter)


def counter_snapshot(counter: torch.Tensor) -> torch.Tensor:
    """A copy of a noise counter buffer that is about to be advanced, for the backward to read.

    Under torch.compile (inductor) a plain `counter.clone()` is recomputed in the backward from
    the buffer, after the forward advanced it (torch 2.14's partitioner treats the clone of a
    mutated graph input as free to recompute): the backward then drew the noise of counter + 1.
    An opaque op is never recomputed, so its output is saved. Eager mode clones directly.
    """
    return _counter_snapshot(counter) if torch.compiler.is_compiling() else counter.clone()


def rounding_noise(shape, counter: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform noise in (-0.5, 0.5) for stochastic rounding: Philox4x32-10 of (seed, counter, index).

    16-bit resolution: u = (k + 0.5) / 65536 for k in [-32768, 32767], exactly symmetric around 0,
    so the rounding stays unbiased. Element i of the flattened `shape` gets the same value in the
    fused kernel (which never materialises it) and here, on any device, for any thread count.
    """
    shape = tuple(shape)
    numel = 1
    for d in shape:
        numel *= d
    if counter.device.type == "cpu" and fused_kernels_enabled():
        return torch.ops.fracfx.rounding_noise(numel, counter, seed).view(shape)
    return philox.rounding_noise(numel, counter, seed).view(shape)


def quantize(x: torch.Tensor, lo: torch.Tensor, s: torch.Tensor, qmax, counter: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """fake_quant_scaled(x, lo, s, qmax[, noise of (seed, counter)]) on the fastest path at hand.

    lo and s are per tensor (one element) or per row of x's first axis (shape (R, 1, ...) or (R,));
    qmax is an int, or a per-row tensor where 0 leaves that row in FP32 (unquantized).
    """
    rows = x.shape[0] if x.dim() else 1
    row_qmax = qmax if isinstance(qmax, torch.Tensor) else None
    if row_qmax is None and _traced_formula() and (counter is None or compile_mode == "formula" or not _fused_for(x)):
        # under torch.compile: the formula itself, so inductor fuses it with its neighbours (the
        # noise, if any, from the Philox op: one write, read back inside the fused kernel)
        return fake_quant_scaled(x, lo, s, qmax, None if counter is None else rounding_noise(x.shape, counter, seed).to(x.device))
    if _fused_for(x) and all(_rowwise(t, rows) for t in (lo, s) + ((row_qmax,) if row_qmax is not None else ())):
        return torch.ops.fracfx.fake_quant(x, lo.reshape(-1), s.reshape(-1), 0.0 if row_qmax is not None else float(qmax),
                                           None if row_qmax is None else row_qmax.reshape(-1).float(), counter, seed)
    noise = None if counter is None else rounding_noise(x.shape, counter, seed).to(x.device)
    if row_qmax is None:
        return fake_quant_scaled(x, lo, s, qmax, noise)
    bshape = (rows,) + (1,) * (x.dim() - 1)
    qmax = row_qmax.to(x.dtype).view(bshape)
    fp32 = qmax == 0
    if not bool(fp32.any()):  # the common case: skip two full passes of torch.where
        return fake_quant_scaled(x, _per_row(lo, bshape), _per_row(s, bshape), qmax, noise)
    out = fake_quant_scaled(x, _per_row(lo, bshape), _per_row(s, bshape), torch.where(fp32, torch.ones_like(qmax), qmax), noise)
    return torch.where(fp32, x, out)


def _rowwise(t: torch.Tensor, rows: int) -> bool:
    """t holds one value, or one per row of x's first axis."""
    return t.numel() == 1 or (t.dim() >= 1 and t.shape[0] == rows and t.numel() == rows)


def _per_row(t: torch.Tensor, bshape) -> torch.Tensor:
    return t if t.numel() == 1 else t.reshape(bshape)


def tensor_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (lo, R) = (min, max - min), detached."""
    x = x.detach()
    lo, hi = torch.ops.fracfx.minmax(x) if _fused_for(x) and x.numel() and not _traced_formula() else torch.aminmax(x)
    return lo, hi - lo


def _row_min_max(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _fused_for(rows) and rows.numel() and not _traced_formula():
        return torch.ops.fracfx.row_minmax(rows, rows.shape[0])
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
        return quantize(x, lo, s, qmax)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class _TracedActSTE(torch.autograd.Function):
    """FakeQuantSTE of an activation as torch.compile traces it: a backward that reads x.

    grad * (x * 0 + 1) is grad bit for bit wherever x is finite (x * 0 is +-0, plus 1 is exactly
    1); a non-finite activation already makes the quantizer's range, and so its output, NaN. Why:
    the conv after the quantizer saves q(x), not x, so AOTAutograd's partitioner would keep
    ReLU's boolean mask (1 byte per element, cheaper than x's 4) for the ReLU backward, and
    inductor's CPU code stores and loads bool masks through a generic scalar path (VecMask ->
    bool, ~25 ns per element in torch 2.14: 50 ms per 2M-element layer at 1 thread). Reading x
    here makes x saved, as the FP32 model's conv saves it, and the mask is recomputed from x for
    free. docs/kernels.md ("torch.compile") has the measurements.
    """

    @staticmethod
    def forward(ctx, x, lo, s, qmax):
        ctx.save_for_backward(x)
        return quantize(x, lo, s, qmax)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x * 0 + 1), None, None, None


def act_fake_quant(x: torch.Tensor, lo: torch.Tensor, s: torch.Tensor, qmax) -> torch.Tensor:
    """An activation quantizer's FakeQuantSTE (under torch.compile, unless compile_mode is "ops": _TracedActSTE)."""
    return (_TracedActSTE if _traced_formula() else FakeQuantSTE).apply(x, lo, s, qmax)


class GradQuantFn(torch.autograd.Function):
    """Identity in forward; in backward quantizes dL/dY with stochastic rounding.

    The quantized tensor is what flows on into the op's backward, so both dX and dW are computed
    from the same quantized gradient. The rounding noise is that of (`seed`, `counter`) (the
    quantizer's seed and its call counter at forward time, a one-element int64 tensor).
    `sample_qmax` (B,) gives per-sample bits for DFQ: each sample's range is taken over the
    samples with the same bits only (no leakage between groups); entries of 0 leave that sample's
    gradient in FP32. `sample_group` (B,) ints, if given, defines the range groups instead (DFQ:
    the candidate each sample chose). `range_sync` (fracfx.runtime.sync_stats.RangeSync) takes the
    ranges over every rank of a data-parallel run; grouped ranges then need `num_groups` (group
    ids are 0..num_groups-1).
    """

    @staticmethod
    def forward(ctx, y, qmax, counter, seed, stochastic, sample_qmax, sample_group=None, copy_output=True, range_sync=None, num_groups=None):
        ctx.qmax, ctx.seed, ctx.stochastic = qmax, seed, stochastic
        ctx.range_sync, ctx.num_groups = range_sync, num_groups
        ctx.grouped = sample_qmax is not None
        ctx.save_for_backward(counter, sample_qmax, sample_group)
        # Autograd refuses in-place writes (conv -> ReLU(inplace=True)) on a view made inside a
        # Function, so such consumers get a copy; insert_quant knows the consumers and turns the
        # copy off when none writes in place (saves one pass over every output).
        return y.clone() if copy_output else y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        counter, sample_qmax, sample_group = ctx.saved_tensors
        counter = counter if ctx.stochastic else None
        if not ctx.grouped:
            lo, rng = tensor_range(grad) if ctx.range_sync is None else ctx.range_sync.tensor_range(grad)
            out = quantize(grad, lo, scale_of(rng, ctx.qmax), ctx.qmax, counter, ctx.seed)
        else:
            out = _grouped_quant(grad, sample_qmax, counter, ctx.seed, sample_group, ctx.range_sync, ctx.num_groups)
        return out, None, None, None, None, None, None, None, None, None


def _grouped_quant(grad: torch.Tensor, sample_qmax: torch.Tensor, counter: torch.Tensor | None, seed: int = 0,
                   groups: torch.Tensor | None = None, range_sync=None, num_groups: int | None = None) -> torch.Tensor:
    """Quantize each sample at its own qmax, with (lo, R) pooled over its group's samples only.

    Groups are the samples sharing a qmax, or the given (B,) `groups` ids (samples in one group
    must share a qmax). A sample's grid therefore depends on its own group's gradients alone.
    With `range_sync`, a group's range spans its samples on every rank (ids 0..num_groups-1).
    With `counter`, rounding is stochastic with the noise of (seed, counter).
    """
    batch = grad.shape[0]
    flat = grad.detach().reshape(batch, -1)
    sample_lo, sample_hi = _row_min_max(flat)
    if range_sync is None:
        if groups is not None and num_groups is not None:
            ids, count = groups, num_groups  # no torch.unique: no sync, no data-dependent shape
        else:
            ids = torch.unique(sample_qmax if groups is None else groups, return_inverse=True)[1]
            count = batch
        lo = sample_lo.new_full((count,), float("inf")).scatter_reduce(0, ids, sample_lo, "amin")[ids]
        hi = sample_hi.new_full((count,), float("-inf")).scatter_reduce(0, ids, sample_hi, "amax")[ids]
    else:
        if groups is None or num_groups is None:
            raise ValueError("ranges synchronised across ranks need explicit group ids and num_groups (the same on every rank)")
        group_lo = sample_lo.new_full((num_groups,), float("inf")).scatter_reduce(0, groups, sample_lo, "amin")
        group_hi = sample_hi.new_full((num_groups,), float("-inf")).scatter_reduce(0, groups, sample_hi, "amax")
        group_lo, group_hi = range_sync.group_min_max(group_lo, group_hi)
        lo, hi = group_lo[groups], group_hi[groups]
    qmax = sample_qmax.to(grad.dtype)
    # each sample's step as the static quantizer computes it (rows at qmax 0 stay FP32; their step is unused)
    s = scale_of(hi - lo, torch.where(qmax == 0, torch.ones_like(qmax), qmax))
    return quantize(grad, lo, s, sample_qmax, counter, seed)
