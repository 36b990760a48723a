"""Rounding of weight channels that the fast int8 format must re-quantize, guided by calibration data.

A channel whose integer weights exceed the format's limit (bn_folding.headroom_limit: 8-bit
asymmetric codes, |q - zp| up to 255) moves onto a coarser step. Rounding each weight to the
nearest point of that step treats every weight alike; what the model sees is the conv's output,
whose error for a weight change dW of one output channel is, over the calibration inputs x
(the conv's im2col patches),

    E[(dW . x)^2] = dW H dW^T,   H = E[x x^T]   (one K x K matrix per conv group, K = C_in/g * kh * kw)

`round_with_feedback` rounds the weights one input position at a time, the largest E[x_k^2]
first, and moves the rounding error of each onto the positions not yet rounded, along H (the
optimal-brain-quantization update as GPTQ, Frantar et al. 2023, computes it with a Cholesky
factor of H^-1), so the errors cancel in the output instead of adding up. Without calibration data H is the identity and this is
round-to-nearest. `input_hessians` measures H on the frozen model, whose inputs are the ones
the file's integer kernels see.

Bias correction. A weight change dW also moves the output's mean by dW . E[x], a systematic
shift (post-ReLU inputs are all positive) that the conv's bias absorbs exactly: bias -= dW . mu.
With that shift corrected, what remains is dW C dW^T with C = H - mu mu^T, the patches'
covariance, so `InputMoments.covariance` is what the rounding minimises (bn_folding.fold).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn.functional as F

from fracfx.export.int8_plan import _arg

MAX_ROWS = 8192  # im2col rows per batch that enter H (a seeded subset beyond that: statistics, not every pixel)
DAMPING = 0.01  # of H's mean diagonal, added to the diagonal: keeps the Cholesky factorisation stable


@dataclasses.dataclass(frozen=True)
class InputMoments:
    """The first two moments of a conv's (or linear's) input patches over calibration data, float64."""

    covariance: torch.Tensor  # [groups, K, K]: E[(x - mu)(x - mu)^T]
    mean: torch.Tensor  # [groups, K]: mu = E[x]

    @property
    def hessian(self) -> torch.Tensor:
        """E[x x^T]."""
        return self.covariance + torch.einsum("gk,gm->gkm", self.mean, self.mean)

    def mean_shift(self, delta: torch.Tensor) -> torch.Tensor:
        """Per output channel, delta . E[x] (delta: [C_out, K]): how far the change moves the output's mean."""
        groups = self.mean.shape[0]
        return torch.einsum("gck,gk->gc", delta.double().view(groups, -1, delta.shape[1]), self.mean).reshape(-1)


def _patches(node: fx.Node, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The conv's (or linear's) input as rows [groups, rows, K], in the weight's flattening order."""
    if weight.dim() == 2:  # linear: every leading position is a row
        return x.reshape(1, -1, x.shape[-1])
    groups = int(_arg(node, 6, "groups", 1))
    stride, padding, dilation = (_arg(node, i, n, d) for i, n, d in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))
    cols = F.unfold(x, weight.shape[2:], dilation=dilation, padding=padding, stride=stride)  # [N, C_in * kh * kw, L]
    cols = cols.view(x.shape[0], groups, -1, cols.shape[-1])  # channel-major per group, as weight.reshape(C_out, -1)
    return cols.permute(1, 0, 3, 2).reshape(groups, -1, cols.shape[2])


@torch.no_grad()
def input_moments(frozen: fx.GraphModule, names: list[str], inputs: tuple, *, batch_size: int = 32, seed: int = 0) -> dict[str, InputMoments]:
    """Per named conv/linear node (input 0: activation codes' values, input 1: the FrozenWeight):
    the InputMoments of its patches over the calibration inputs."""
    if not names:
        return {}
    # moments of x - c, c the first batch's mean: post-ReLU patches have a mean far above their
    # spread, and E[x x^T] - mu mu^T in float32 products would cancel to noise (even negative variances)
    wanted, shifts, sums, firsts, counts = set(names), {}, {}, {}, {}
    generator = torch.Generator().manual_seed(seed)

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.name in wanted:
                x, weight = (self.env[a] for a in node.args[:2])
                rows = _patches(node, x.float(), weight)
                if rows.shape[1] > MAX_ROWS:
                    rows = rows[:, torch.randperm(rows.shape[1], generator=generator)[:MAX_ROWS]]
                shift = shifts.setdefault(node.name, rows.mean(dim=1, keepdim=True))
                rows = rows - shift
                h = torch.einsum("grk,grm->gkm", rows, rows).double()  # float32 products, summed per batch then in float64
                sums[node.name] = sums.get(node.name, 0) + h
                firsts[node.name] = firsts.get(node.name, 0) + rows.sum(dim=1).double()
                counts[node.name] = counts.get(node.name, 0) + rows.shape[1]
            return out

    frozen.eval()
    for start in range(0, inputs[0].shape[0], batch_size):
        Recorder(frozen).run(*(t[start:start + batch_size] for t in inputs))
    out = {}
    for name in sums:
        centered_mean = firsts[name] / counts[name]
        covariance = sums[name] / counts[name] - torch.einsum("gk,gm->gkm", centered_mean, centered_mean)
        out[name] = InputMoments(covariance, centered_mean + shifts[name].squeeze(1).double())
    return out


def output_error(delta: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """Per output channel, delta H delta^T (delta: [C_out, K]; H: [groups, K, K]); the sum of squares without H."""
    if hessian is None:
        return (delta ** 2).sum(dim=1)
    groups = hessian.shape[0]
    d = delta.view(groups, -1, delta.shape[1])
    return torch.einsum("gck,gkm,gcm->gc", d, hessian, d).reshape(-1)


def _feedback_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1 (GPTQ's error-feedback weights), H damped until it factors.

    A position whose input never varies (a dead channel, padding, a saturated ReLU6) has no
    variance to feed an error into: it is rounded on its own (its mean shift goes to the bias).
    Damping starts at DAMPING of the mean diagonal and grows tenfold while round-off leaves H
    indefinite; a group that still does not factor is rounded to nearest (identity factor).
    """
    k = h.shape[0]
    diagonal = torch.diagonal(h).clone()
    dead = diagonal <= 1e-12 * diagonal.abs().max().clamp(min=1e-300)
    h = h.clone()
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    eye = torch.eye(k, dtype=h.dtype)
    level = torch.diagonal(h).mean()
    for damping in (DAMPING, 0.1, 1.0, 10.0):
        factor, info = torch.linalg.cholesky_ex(h + damping * level * eye)
        if int(info) == 0:
            inverse_factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info) == 0:
                return inverse_factor
    return eye


def round_with_feedback(w: torch.Tensor, limit: int, hessian: torch.Tensor | None) -> torch.Tensor:
    """Integers in [-limit, limit] for the real weights w [C_out, K] (in units of each channel's step).

    Round-to-nearest without a hessian; with one, each group's channels are rounded position by
    position with the error fed forward (module docstring).
    """
    if hessian is None:
        return torch.round(w).clamp(-limit, limit)
    groups, k = hessian.shape[0], w.shape[1]
    out = torch.empty_like(w)
    for g, (rows, h) in enumerate(zip(w.double().view(groups, -1, k), hessian)):
        # largest input energy first ("act order"): the positions that move the output most are
        # rounded while the most positions are left to absorb their error (halved the output error
        # of a trained 8-bit cifar_resnet8 against rounding in storage order)
        order = torch.argsort(torch.diagonal(h), descending=True)
        rows, h = rows[:, order].clone(), h[order][:, order].clone()
        upper = _feedback_factor(h)
        for i in range(k):
            q = torch.round(rows[:, i]).clamp(-limit, limit)
            err = (rows[:, i] - q) / upper[i, i]
            rows[:, i] = q
            rows[:, i + 1:] -= err[:, None] * upper[i, i + 1:][None, :]
        out.view(groups, -1, k)[g][:, order] = rows.to(out.dtype)
    return out
