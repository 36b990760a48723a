"""The DFQ gate choice and per-sample mixed quantizers, against formulas written out here."""

import pytest
import torch
import torch.nn.functional as F

from fracfx.config import CIFAR_CANDIDATES
from fracfx.nn.mixed import FP32Rows, MixedActQuant, MixedGradQuant, SkipMix
from fracfx.nn.gates import CandidateTable, GateChoice
from fracfx.nn.quantizers import ActQuant


TABLE = CandidateTable(CIFAR_CANDIDATES + ("fp32", "skip"))  # a: 3 4 4 6 6 fp32 -
CHOICES = torch.tensor([0, 1, 2, 3, 4, 5, 6, 2, 0])


def fq(x, lo, rng, bits):
    """docs/method.md section 1, nearest rounding, written independently of fracfx.nn.quant."""
    qmax = 2**bits - 1
    s = torch.clamp(rng / qmax, min=1e-8)
    return torch.round(torch.clamp((x - lo) / s, 0, qmax)) * s + lo


def straight_through_mask(choices, k):
    """A mask as the gate makes it: one-hot forward (up to rounding of h - p + p), softmax backward."""
    p = F.softmax(torch.randn(len(choices), k), dim=1)
    return F.one_hot(choices, k).float() - p + p


def test_gate_choice_is_one_hot_on_ties_and_at_batch_size_one():
    gate = GateChoice(TABLE)
    for logits in (torch.zeros(1, 7), torch.tensor([[0.0, 2.0, 2.0, 1.0, 2.0, 0.0, 0.0]] * 3)):
        logits.requires_grad_(True)
        mask = gate(logits)
        expected = 0 if logits[0, 0] == 0 and logits.max() == 0 else 1  # first maximal index
        assert torch.equal((mask.detach() != 0).sum(1), torch.ones(len(logits), dtype=torch.int64))
        assert (gate.last_choice == expected).all() and (mask.detach()[:, expected] > 0.99).all()
        weights = torch.randn(7)
        (grad_mask,) = torch.autograd.grad((mask * weights).sum(), logits)
        (grad_p,) = torch.autograd.grad((F.softmax(logits, 1) * weights).sum(), logits)
        assert torch.allclose(grad_mask, grad_p, atol=1e-7)  # straight through: the softmax Jacobian


def test_activation_forward_is_fq_at_each_samples_bits_bit_exact():
    x = torch.randn(len(CHOICES), 3, 5, 5)
    mixed = MixedActQuant(TABLE).train()
    out = mixed(x, straight_through_mask(CHOICES, len(TABLE)))
    lo, hi = x.min(), x.max()
    for i, k in enumerate(CHOICES.tolist()):
        bits = TABLE.act_bits[k]
        expected = x[i] if not bits else fq(x, lo, hi - lo, bits)[i]  # range of the whole batch
        assert torch.equal(out[i], expected), (i, k)
        if bits:  # and identical to the static quantizer at those bits on the same batch
            assert torch.equal(out[i], ActQuant(bits).train()(x)[i])


def test_activation_eval_uses_running_ranges_like_the_static_quantizer():
    x = torch.randn(len(CHOICES), 4, 3, 3) * 2
    mixed, static = MixedActQuant(TABLE, momentum=0.5), ActQuant(4, momentum=0.5)
    mask = straight_through_mask(CHOICES, len(TABLE))
    for _ in range(3):
        mixed(x, mask), static(x)
    mixed.eval(), static.eval()
    probe = torch.randn(len(CHOICES), 4, 3, 3) * 3  # outside the running range: clamped
    out = mixed(probe, mask)
    rows = CHOICES == 1  # (4, 6)
    assert torch.equal(out[rows], static(probe)[rows])


@pytest.mark.parametrize("training", [True, False], ids=["batch-range", "running-range"])
def test_activation_backward_is_straight_through_and_mask_gradient_is_the_inner_product(training):
    x = torch.randn(len(CHOICES), 2, 4, 4, requires_grad=True)
    mask = F.one_hot(CHOICES, len(TABLE)).float().requires_grad_(True)
    upstream = torch.randn(len(CHOICES), 2, 4, 4)
    quant = MixedActQuant(TABLE).train(training)
    quant.running_lo.fill_(-1.0), quant.running_range.fill_(1.5)  # eval: values above 0.5 clamp
    (quant(x, mask) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)
    xd, ud = x.detach().double(), upstream.double()
    lo, rng = (xd.min(), xd.max() - xd.min()) if training else (torch.tensor(-1.0, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64))
    for k, bits in enumerate(TABLE.act_bits):
        if bits is None:
            expected = torch.zeros(len(CHOICES), dtype=torch.float64)  # skip acts at the block output
        else:
            expected = (ud * (xd if bits == 0 else fq(xd, lo, rng, bits))).flatten(1).sum(1)
        assert torch.allclose(mask.grad[:, k].double(), expected, rtol=1e-5, atol=1e-5), k


def _grad_through(quant, upstream, mask, seed):
    y = torch.zeros_like(upstream, requires_grad=True)
    quant.seed(seed)
    quant.train()(y, mask).backward(upstream)
    return y.grad


def test_gradient_rows_lie_on_their_own_candidate_groups_grid():
    table = CandidateTable(((3, 6), (4, 6), (6, 12), "fp32"))  # two candidates share 6-bit gradients
    choices = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2])
    mask = F.one_hot(choices, 4).float()
    upstream = torch.randn(8, 3, 6, 6) * torch.arange(1, 9).view(8, 1, 1, 1)
    quant = MixedGradQuant(table)
    grad = _grad_through(quant, upstream, mask, seed=3)
    for k, bits in enumerate(table.grad_bits):
        rows = choices == k
        if bits == 0:
            assert torch.equal(grad[rows], upstream[rows])
            continue
        lo, hi = upstream[rows].min(), upstream[rows].max()  # this candidate's samples only
        step = (hi - lo) / (2**bits - 1)
        levels = (grad[rows] - lo) / step
        assert torch.allclose(levels, levels.round(), atol=2e-3), k
        assert levels.round().min() >= 0 and levels.round().max() <= 2**bits - 1
        assert levels.round().unique().numel() <= 2**bits
    # Changing other groups' gradients cannot move a group's quantized gradient.
    changed = upstream.clone()
    changed[choices != 0] *= 100
    again = _grad_through(quant, changed, mask, seed=3)
    assert torch.equal(again[choices == 0], grad[choices == 0])


def test_one_candidate_group_is_the_static_tensor_range_quantizer():
    upstream = torch.randn(4, 8)
    grad = _grad_through(MixedGradQuant(CandidateTable(((4, 8), (6, 12)))), upstream, F.one_hot(torch.zeros(4, dtype=torch.int64), 2).float(), 0)
    step = (upstream.max() - upstream.min()) / 255
    levels = (grad - upstream.min()) / step
    assert torch.allclose(levels, levels.round(), atol=2e-3) and (grad - upstream).abs().max() <= step


def test_fp32_rows_recompute_with_the_unquantized_weight():
    table = CandidateTable(((4, 8), "fp32"))
    x, w = torch.randn(4, 3, 6, 6), torch.randn(5, 3, 3, 3)
    y = F.conv2d(x, w.round(), None, 1, 1)  # stands in for the quantized-weight result
    choices = torch.tensor([1, 0, 1, 0])
    out = FP32Rows(F.conv2d, table.fp32_index)(y, F.one_hot(choices, 2).float(), x, w, None, 1, 1)
    assert torch.equal(out[choices == 0], y[choices == 0])
    assert torch.equal(out[choices == 1], F.conv2d(x[choices == 1], w, None, 1, 1))


def test_skip_gives_the_shortcut_and_its_mask_gradient():
    out = torch.randn(4, 3, 2, 2, requires_grad=True)
    shortcut = torch.randn(4, 3, 2, 2, requires_grad=True)
    choices = torch.tensor([2, 0, 2, 1])
    mask = F.one_hot(choices, 3).float().requires_grad_(True)
    y = SkipMix(2)(out, shortcut, mask)
    skipped = choices == 2
    assert torch.equal(y[skipped], shortcut[skipped]) and torch.equal(y[~skipped], out[~skipped])
    upstream = torch.randn(4, 3, 2, 2)
    y.backward(upstream)
    expected = ((shortcut - out) * upstream).flatten(1).sum(1).detach()  # d/dm of (1-m) out + m sc
    assert torch.allclose(mask.grad[:, 2], expected) and (mask.grad[:, :2] == 0).all()
    assert torch.equal(out.grad[~skipped], upstream[~skipped]) and (out.grad[skipped] == 0).all()
    assert torch.equal(shortcut.grad[skipped], upstream[skipped]) and (shortcut.grad[~skipped] == 0).all()


def test_candidate_costs_match_the_fractrain_table():
    cifar = CandidateTable(CIFAR_CANDIDATES)
    cp = [round(100 * cifar.bitops(k, 4) / (3 * 32 * 32), 3) for k in range(5)]
    assert cp == [1.758, 2.083, 2.604, 3.385, 4.688]
    imagenet = CandidateTable(((3, 6), (4, 8), (6, 12), (8, 16)))
    assert [round(100 * imagenet.bitops(k, 6) / 3072, 3) for k in range(4)] == [2.344, 3.385, 5.859, 8.854]
    extra = CandidateTable(("skip", "fp32"))
    assert extra.bitops(0, 4) == 0 and extra.bitops(1, 4) == 3 * 32 * 32
