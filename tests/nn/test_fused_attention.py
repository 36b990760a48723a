"""FusedAttention: a scaled_dot_product_attention that lower_aten decomposed (torch.export capture)
is the fused op itself while every quantizer of its two products is off, so bits 0 equals the
float model bit for bit, and the quantized decomposition as soon as any of them is on."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracfx
from fracfx.nn.exported import FusedAttention

FP32 = fracfx.QuantConfig(act_bits=0, weight_bits=0, grad_bits=0, keep_fp32=(), capture="export")
Q8 = FP32.replace(act_bits=8, weight_bits=8, grad_bits=8)


class SelfAttention(nn.Module):
    def __init__(self, width=32, heads=4, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x, bias):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if self.causal else bias, is_causal=self.causal, scale=0.3)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 37, 32, generator=g), torch.randn(37, 37, generator=g)


def _model(causal=False):
    torch.manual_seed(0)
    return SelfAttention(causal=causal).eval()


def _decomposed(model, x, bias):
    """The attention written out as lower_aten writes it, on the float model's own weights."""
    b, t, c = x.shape
    q, k, v = (z.view(b, t, model.heads, -1).transpose(1, 2) for z in model.qkv(x).split(c, dim=-1))
    scores = torch.matmul(q, k.transpose(-2, -1)) * 0.3
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).tril().logical_not(), float("-inf")) if model.causal else scores + bias
    y = torch.matmul(torch.softmax(scores, dim=-1), v)
    return model.proj(y.transpose(1, 2).reshape(b, t, c))


def _fused_calls(qm):
    """Record, per FusedAttention call, whether it returned the decomposition (its first input)."""
    used = []
    for module in qm.modules():
        if isinstance(module, FusedAttention):
            module.register_forward_hook(lambda m, args, out: used.append(out is args[0]))
    return used


@pytest.mark.parametrize("causal", [False, True])
def test_bits_zero_is_the_float_model_bit_for_bit(causal):
    model, (x, bias) = _model(causal), _inputs()
    assert not torch.equal(_decomposed(model, x, bias), model(x, bias))  # the decomposition alone is not exact
    qm = fracfx.transform(model, FP32, example_inputs=(x, bias)).eval()
    used = _fused_calls(qm)
    assert torch.equal(qm(x, bias), model(x, bias)) and used == [False]
    qm.train()  # training forward and gradients too (the products' quantizers observe ranges, change nothing)
    xq, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = qm(xq, bias), model.train()(xf, bias)
    assert torch.equal(out, ref)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    assert torch.equal(xq.grad, xf.grad)
    assert torch.equal(qm.get_parameter("qkv.weight").grad, model.qkv.weight.grad)


def test_any_quantizer_on_runs_the_quantized_decomposition():
    model, (x, bias) = _model(), _inputs()
    qm = fracfx.transform(model, Q8, example_inputs=(x, bias))
    used = _fused_calls(qm)
    out = qm(x, bias)  # training mode: batch ranges
    assert used == [True] and torch.isfinite(out).all() and not torch.equal(out, model(x, bias))
    out.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in qm.parameters() if p.grad is not None)
    fracfx.set_bits(qm, act_bits=0, weight_bits=0)  # gradient quantization alone keeps it (backward differs)
    qm(x, bias)
    fracfx.set_bits(qm, grad_bits=0)  # all off (e.g. a precision schedule): the fused op, next call
    exact = torch.equal(qm(x, bias), model.train()(x, bias))
    assert used == [True, True, False] and exact


def test_quantized_eval_matches_the_decomposition_and_freeze_keeps_it():
    model, (x, bias) = _model(), _inputs()
    qm = fracfx.transform(model, Q8.replace(act_bits=16, weight_bits=16, grad_bits=16, act_momentum=0.0), example_inputs=(x, bias))
    qm(x, bias)  # running ranges: this batch's (momentum 0)
    qm.eval()
    out, decomposed = qm(x, bias), _decomposed(model, x, bias)
    torch.testing.assert_close(out, decomposed, rtol=0, atol=1e-3)  # 16 bits: the decomposition up to rounding
    frozen = fracfx.freeze(qm, bits=(16, 16), arithmetic="dequantized")
    assert not any(isinstance(m, FusedAttention) for m in frozen.modules())
    torch.testing.assert_close(frozen(x, bias), out, rtol=0, atol=2e-4)


def test_compiled_model_follows_the_bits_set_between_calls():
    model, (x, bias) = _model(), _inputs()
    qm = fracfx.transform(model, FP32.replace(act_momentum=0.0), example_inputs=(x, bias))
    with torch.no_grad():
        qm(x, bias)  # training mode at bits 0: the products' quantizers still observe their ranges
        qm.eval()
        torch._dynamo.reset()
        compiled = torch.compile(qm, backend="aot_eager")  # the check reads Python ints: dynamo guards on them
        assert torch.equal(compiled(x, bias), model(x, bias))
        fracfx.set_bits(qm, 8, 8, 8)
        out = compiled(x, bias)
        assert torch.equal(out, qm(x, bias)) and not torch.equal(out, model(x, bias))
        torch.testing.assert_close(out, model(x, bias), rtol=0, atol=0.1)  # 8 bits on observed ranges, not garbage
