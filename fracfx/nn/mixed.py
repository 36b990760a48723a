"""Per-sample mixed precision inside a gated block: what insert_gates wires the mask m into.

One op call per layer (never K block copies); each sample runs at its block's chosen candidate.

  MixedActQuant(x, m)   X~ = sum_k m_k fq_{a_k}(X). Forward is exactly fq at each sample's chosen
                        bits (the one-hot m selects, it does not scale), with the range of the
                        whole batch (running ranges in eval), as the static ActQuant. Backward:
                        dX = dX~ (straight through) and dm_k = <dX~_i, fq_{a_k}(X_i)> per sample;
                        the fq of "fp32" is X itself, "skip" gets 0 here (see SkipMix).
  MixedGradQuant(y, m)  identity forward; backward quantizes each sample's dL/dY at its own
                        candidate's gradient bits, (lo, R) over the samples that chose it only.
  FP32Rows(y, m, ...)   for samples that chose "fp32": the op again on their rows with the
                        unquantized weight (their input rows are already unquantized).
  SkipMix(out, sc, m)   samples that chose "skip" get the block's shortcut as output:
                        y = (1 - m_s) out + m_s sc, exact in forward, with that gradient.

Samples that chose "skip" still flow through the block's ops in FP32 (their values feed the
batch statistics of BN layers there); their output and gradients are discarded by SkipMix.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fracfx.errors import ConfigError
from fracfx.nn.gates import CandidateTable, choice_of
from fracfx.nn.quantizers import GradQuant, observed_range
from fracfx.nn.quant import GradQuantFn, _fused_for, qmax_of, quantize, scale_of

_NO_STATIC_BITS = (
    "a DFQ quantizer has per-sample bits, not one bit width; read the cost of a DFQ model from "
    "fracfx.runtime.DFQController(...).cp and .usage"
)


def _rows(selected: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return selected.view((-1,) + (1,) * (like.dim() - 1))


class MixedFakeQuantFn(torch.autograd.Function):
    """X~ = sum_k m_k fq_{a_k}(X) with a one-hot m: see the module docstring."""

    @staticmethod
    def forward(ctx, x, mask, lo, rng, bits, qmax_table, batch_range):
        choice = choice_of(mask)
        qmax = qmax_table[choice]  # (B,) each sample's 2^a - 1; 0 = not quantized
        # each candidate's scale as the static quantizer computes it, then one pass over x:
        # every element sees the same arithmetic as fake_quant at its sample's bits (bit-exact)
        scales = torch.stack([scale_of(rng, qmax_of(b)) if b else torch.ones_like(rng) for b in bits])
        # per row: the sample's step and qmax; qmax 0 ("fp32", "skip") keeps the sample's input
        out = quantize(x, lo, scales[choice], qmax)
        ctx.bits, ctx.batch_range = bits, batch_range
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(x, lo, rng)
        return out

    @staticmethod
    def backward(ctx, grad):
        dmask = None
        if ctx.needs_input_grad[1]:
            x, lo, rng = ctx.saved_tensors
            batch = grad.shape[0]
            g = grad.reshape(batch, -1)
            # per-sample <g, t>; vecdot streams both once (bmm with one column is ~6x slower)
            dot = lambda t: torch.linalg.vecdot(g, t.reshape(batch, -1))
            dmask = grad.new_zeros(batch, len(ctx.bits))
            products: dict[int, torch.Tensor] = {}
            shifted = grad_sum = None
            quantized = sorted({b for b in ctx.bits if b})
            if _fused_for(x) and _fused_for(grad) and len(quantized) <= 16:
                # one pass over x and g for every candidate (fracfx::mixed_act_dots)
                scales = torch.stack([scale_of(rng, qmax_of(b)) for b in quantized]) if quantized else rng.new_zeros((0,))
                qmaxes = torch.tensor([float(qmax_of(b)) for b in quantized])
                dots = torch.ops.fracfx.mixed_act_dots(x, grad, lo, scales, qmaxes, not ctx.batch_range)
                products[0] = dots[:, 0]
                for j, b in enumerate(quantized):
                    products[b] = dots[:, 2 + j] * scales[j] + lo * dots[:, 1]
            for k, b in enumerate(ctx.bits):
                if b is None:  # skip: the block output, not this input, carries its gradient
                    continue
                if b not in products:
                    if b == 0:
                        products[b] = dot(x)
                    else:  # <g, q*s + lo> = s <g, q> + lo sum(g), q the integer grid index
                        if shifted is None:
                            shifted, grad_sum = x - lo, g.sum(1)
                        qmax = qmax_of(b)
                        s = scale_of(rng, qmax)
                        q = shifted / s
                        if not ctx.batch_range:  # with the batch's own range, q is in [0, qmax]
                            q.clamp_(0, qmax)
                        q.round_()
                        products[b] = dot(q) * s + lo * grad_sum
                dmask[:, k] = products[b]
        return grad, dmask, None, None, None, None, None


class MixedActQuant(nn.Module):
    """Activation fake quant at each sample's chosen bits; ranges as ActQuant (batch / running, `range_sync`)."""

    range_sync = None

    def __init__(self, table: CandidateTable, momentum: float = 0.9):
        super().__init__()
        self.table = table
        self.momentum = float(momentum)
        self.register_buffer("running_lo", torch.zeros(()))
        self.register_buffer("running_range", torch.zeros(()))
        qmax = [qmax_of(b) if b else 0 for b in table.act_bits]
        self.register_buffer("candidate_qmax", torch.tensor(qmax, dtype=torch.int64), persistent=False)

    @property
    def current_bits(self) -> int:
        raise ConfigError(_NO_STATIC_BITS)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lo, rng = observed_range(self, x)
        return MixedFakeQuantFn.apply(x, mask, lo, rng, self.table.act_bits, self.candidate_qmax, self.training)

    def extra_repr(self) -> str:
        return f"candidates={self.table.labels}"


class MixedGradQuant(GradQuant):
    """Output-gradient quantizer at each sample's chosen gradient bits (stochastic rounding).

    A GradQuant for seeding and checkpointing its rounding noise (seed, counter); its `bits` buffer is unused.
    """

    def __init__(self, table: CandidateTable, stochastic: bool = True, seed: int = 0):
        super().__init__(0, stochastic, seed)
        self.table = table
        qmax = [qmax_of(b) if b else 0 for b in table.grad_bits]
        self.register_buffer("candidate_qmax", torch.tensor(qmax, dtype=torch.int64), persistent=False)

    @property
    def current_bits(self) -> int:
        raise ConfigError(_NO_STATIC_BITS)

    def forward(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not (y.requires_grad and torch.is_grad_enabled()):
            return y
        choice = choice_of(mask)
        sample_qmax = self.candidate_qmax[choice]
        return GradQuantFn.apply(y, 0, self._next_counter(), self._seed, self.stochastic, sample_qmax, choice, self.copy_output,
                                 self.range_sync, len(self.candidate_qmax))

    def extra_repr(self) -> str:
        return f"candidates={self.table.labels}, stochastic={self.stochastic}"


class FP32Rows(nn.Module):
    """Replaces the rows of y whose sample chose candidate `index` by fn(input rows, FP32 weight, ...)."""

    def __init__(self, fn: Callable, index: int):
        super().__init__()
        self.fn, self.index = fn, index

    def forward(self, y: torch.Tensor, mask: torch.Tensor, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = (choice_of(mask) == self.index).nonzero().flatten()
        if rows.numel() == 0:
            return y
        return y.index_copy(0, rows, self.fn(x.index_select(0, rows), *args, **kwargs))

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', self.fn)}, candidate={self.index}"


class SkipMixFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, shortcut, mask, index):
        if out.shape != shortcut.shape:
            raise ConfigError(f"'skip' needs the block output and its shortcut to have one shape, got {tuple(out.shape)} and {tuple(shortcut.shape)}; remove 'skip' from candidates")
        skip = _rows(choice_of(mask) == index, out)
        ctx.index, ctx.num_candidates = index, mask.shape[1]
        ctx.save_for_backward(skip, out, shortcut)
        return torch.where(skip, shortcut, out)

    @staticmethod
    def backward(ctx, grad):
        skip, out, shortcut = ctx.saved_tensors
        zero = grad.new_zeros(())
        dmask = None
        if ctx.needs_input_grad[2]:
            dmask = grad.new_zeros(grad.shape[0], ctx.num_candidates)
            dmask[:, ctx.index] = ((shortcut - out) * grad).flatten(1).sum(1)
        return torch.where(skip, zero, grad), torch.where(skip, grad, zero), dmask, None


class SkipMix(nn.Module):
    """y = shortcut for samples that chose candidate `index` ("skip"), else the block output."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, out: torch.Tensor, shortcut: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return SkipMixFn.apply(out, shortcut, mask, self.index)

    def extra_repr(self) -> str:
        return f"candidate={self.index}"
