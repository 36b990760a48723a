"""Batch statistics over the global batch: BatchNorm and quantizer ranges across ranks.

Under DistributedDataParallel each rank sees only its share of the batch, so every statistic a
layer takes over the batch becomes per-rank: BatchNorm's mean and variance, and FracTrain's
per-tensor quantizer ranges (activation min/max in forward, gradient min/max in backward, DFQ's
per-candidate gradient ranges). These two converters make them global again, so N ranks
compute what one process computes on the whole batch (up to float summation order):

    sync_batchnorm(model, ranks)        # --sync_bn: every _BatchNorm -> CrossRankBatchNorm
    sync_quantizer_ranges(model, ranks) # --sync_ranges: min/max over all ranks (exact)

torch.nn.SyncBatchNorm runs only on GPUs; CrossRankBatchNorm works on every device (gloo on
CPU, nccl on CUDA). `ranks` is a fracfx.runtime.distributed.RankContext (anything with
world_size and the in-place tensor collectives sum_ and min_). Both converters change the model in place (like
torch.nn.SyncBatchNorm.convert_sync_batchnorm), keep every Parameter and buffer object (an
optimizer built before stays valid) and the state_dict keys, so checkpoints load into the plain
model. Outside training mode, or in a world of one, the layers behave exactly as before.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fracfx.nn.mixed import MixedActQuant
from fracfx.nn.quantizers import ActQuant, GradQuant


class _CrossRankBatchNormFn(torch.autograd.Function):
    """Training-mode batch norm over the global batch, in the arithmetic of torch's CPU kernel.

    As aten/src/ATen/native/cpu/batch_norm_kernel.cpp: per-channel sums accumulated in float64
    (here: over this rank's share, then summed over ranks), mean = float(sum / N), the biased
    variance from the float64 sum of float32 squared deviations (two-pass), invstd in float64,
    y = x * alpha + beta with alpha = invstd * w and beta = b - mean * alpha in float32. The
    float64 sums make the statistics independent of how the batch is split (as torch's are of
    the sample order). Backward: sum(dy) and sum((x - mean) dy), float64 and summed over ranks,
    give dx = (dy - sum / N - (x - mean) * dotp * invstd^2 / N) * invstd * w; dw = dotp * invstd
    and db = sum(dy) are this rank's own (DDP averages them). Three all_reduces per layer and
    training step (ranks.sum_).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, ranks):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        acc = torch.float64
        stats = ranks.sum_(torch.cat([x.sum(dims, dtype=acc), torch.tensor([x.numel() // x.shape[1]], dtype=acc, device=x.device)]))
        count = stats[-1]
        mean = (stats[:-1] / count).to(x.dtype)
        centered = x - mean.view(shape)
        var = ranks.sum_((centered * centered).sum(dims, dtype=acc)).to(x.dtype) / count.to(x.dtype)
        invstd = (1.0 / torch.sqrt(var.to(acc) + eps)).to(x.dtype)
        alpha = invstd if weight is None else invstd * weight
        beta = -mean * alpha if bias is None else bias - mean * alpha
        y = x * alpha.view(shape) + beta.view(shape)
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.ranks, ctx.count = ranks, count
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x, mean, invstd, weight = ctx.saved_tensors
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        acc = torch.float64
        centered = x - mean.view(shape)
        sum_dy, dotp = dy.sum(dims, dtype=acc), (centered * dy).sum(dims, dtype=acc)
        grad_weight = (dotp.to(x.dtype) * invstd) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(x.dtype) if ctx.needs_input_grad[2] else None
        both = ctx.ranks.sum_(torch.cat([sum_dy, dotp])).to(x.dtype)
        channels, count = x.shape[1], ctx.count.to(x.dtype)
        grad_mean, k = both[:channels] / count, both[channels:] * invstd * invstd / count
        dx = (dy - grad_mean.view(shape) - centered * k.view(shape)) * invstd.view(shape)
        if weight is not None:
            dx = dx * weight.view(shape)
        return dx, grad_weight, grad_bias, None, None


class CrossRankBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all ranks).

    See _CrossRankBatchNormFn for the arithmetic. Running statistics are updated with the
    unbiased variance, as BatchNorm does; eval mode is plain BatchNorm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, ranks=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.ranks = ranks

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (batch, channels, ...), got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.ranks is None or self.ranks.world_size == 1:
            return super().forward(x)
        self._check_input_dim(x)
        y, mean, var, count = _CrossRankBatchNormFn.apply(x, self.weight, self.bias, self.eps, self.ranks)
        if self.track_running_stats:
            self._update_running(mean, var, float(count))
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, ranks) -> "CrossRankBatchNorm":
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, ranks=ranks)
        if bn.affine:
            new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var, new.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
        new.train(bn.training)
        return new


def sync_batchnorm(model: nn.Module, ranks) -> int:
    """Replace every BatchNorm of `model` (in place) by a CrossRankBatchNorm over `ranks`; returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, CrossRankBatchNorm):
                setattr(parent, name, CrossRankBatchNorm.from_batchnorm(child, ranks))
                replaced += 1
    return replaced


class RangeSync:
    """Min/max over all ranks, for the quantizers' per-tensor and per-group ranges (exact: min and max do not round)."""

    def __init__(self, ranks):
        self.ranks = ranks

    def tensor_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, R) of x over all ranks: what fracfx.nn.quant.tensor_range gives on the global batch."""
        lo, hi = torch.aminmax(x.detach())
        both = self.ranks.min_(torch.stack([lo, -hi]))
        lo, hi = both[0], -both[1]
        return lo, hi - lo

    def group_min_max(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Element-wise min of lo and max of hi over all ranks (empty groups hold +inf / -inf)."""
        both = self.ranks.min_(torch.cat([lo, -hi]))
        return both[: lo.numel()], -both[lo.numel():]

    def __deepcopy__(self, memo):
        return self


def sync_quantizer_ranges(model: nn.Module, ranks) -> int:
    """Make every activation and gradient quantizer of `model` take its range over all ranks; returns how many.

    Weight quantizers need nothing: DDP keeps the weights identical on every rank.
    """
    sync = RangeSync(ranks)
    count = 0
    for module in model.modules():
        if isinstance(module, (ActQuant, GradQuant, MixedActQuant)):
            module.range_sync = sync
            count += 1
    return count
