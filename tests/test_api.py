"""transform(): the quantized graph, bit-exactness when disabled, gradients, cost, errors."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fracfx
from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant
from fracfx.nn.quant import rounding_noise
from tests.nn.test_quant import reference_fq


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", groups=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.conv2(y)
        y = torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1)
        attn = torch.matmul(y.unsqueeze(2), y.unsqueeze(1))  # a matmul of two activations
        return self.fc(y + attn.mean(-1))


def _count(gm, kind):
    return sum(type(m) is kind for m in gm.modules())


def test_quant_nodes_are_in_the_graph_and_original_untouched():
    model = SmallNet()
    before = copy.deepcopy(model.state_dict())
    gm = fracfx.transform(model, fracfx.QuantConfig(keep_fp32=()), example_inputs=torch.randn(2, 3, 8, 8))
    text = str(gm.graph)
    assert "fracfx_quant" in text
    # conv1, conv2, fc: one act + one weight quantizer each; matmul: two act quantizers
    assert _count(gm, ActQuant) == 5 and _count(gm, WeightQuant) == 3 and _count(gm, GradQuant) == 4
    assert all(type(m) not in (ActQuant, GradQuant) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    gm(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(before) <= set(gm.state_dict()), "parameter names are kept"


def test_disabled_quantization_is_bit_exact_forward_and_backward():
    torch.manual_seed(0)
    model = SmallNet()
    gm = fracfx.transform(model, fracfx.QuantConfig(keep_fp32=()))
    fracfx.set_bits(gm, 0, 0, 0)
    x = torch.randn(4, 3, 8, 8)
    for mode in ("train", "eval"):
        model.train(mode == "train"), gm.train(mode == "train")
        assert torch.equal(model(x), gm(x))
    model.train(), gm.train()
    model.zero_grad(), gm.zero_grad()
    model(x).square().sum().backward()
    gm(x).square().sum().backward()
    grads = dict(gm.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, grads[name].grad), name


def test_one_quantized_gradient_feeds_both_dx_and_dw():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 4, bias=False))
    gm = fracfx.transform(model, fracfx.QuantConfig(keep_fp32=(), act_bits=0, weight_bits=0, grad_bits=4))
    fracfx.seed_rounding(gm, 5)
    grad_quant = next(m for m in gm.modules() if isinstance(m, GradQuant))
    seed, counter = grad_quant.noise_seed, grad_quant.noise_counter.clone()  # the noise the next backward uses
    x = torch.randn(3, 6, requires_grad=True)
    upstream = torch.randn(3, 4)
    gm(x).backward(upstream)
    g = upstream.numpy()
    gq = torch.from_numpy(reference_fq(g, g.min(), g.max() - g.min(), 4, rounding_noise(g.shape, counter, seed).numpy()))
    weight = gm.get_parameter("0.weight")
    assert torch.allclose(x.grad, gq @ weight.detach(), atol=1e-6)
    assert torch.allclose(weight.grad, gq.T @ x.detach(), atol=1e-6)


def test_keep_fp32_shortcuts_and_globs():
    model = SmallNet()
    gm = fracfx.transform(model)  # default keeps the last layer
    reasons = {op.module_path: op.reason for op in fracfx.fp32_report(gm)}
    assert reasons == {"fc": "@last kept FP32"}
    gm = fracfx.transform(model, fracfx.QuantConfig(keep_fp32=("@first", "conv*")))
    paths = {op.module_path for op in fracfx.fp32_report(gm)}
    assert paths == {"conv1", "conv2"}


def test_set_bits_and_cost_report_follow_the_formula():
    model = SmallNet()
    gm = fracfx.transform(model, fracfx.QuantConfig(keep_fp32=()), example_inputs=torch.randn(2, 3, 8, 8))
    fracfx.set_bits(gm, act_bits=4, grad_bits=6)  # weights stay at 8
    report = fracfx.cost_report(gm)
    conv1 = next(r for r in report.rows if r.module_path == "conv1")
    assert conv1.macs == 8 * 8 * 8 * 3 * 9  # out elems per sample * (C_in/groups * kh * kw)
    conv2 = next(r for r in report.rows if r.module_path == "conv2")
    assert conv2.macs == 8 * 8 * 8 * 4 * 9
    assert (conv1.act_bits, conv1.weight_bits, conv1.grad_bits) == (4, 8, 6)
    assert conv1.effective_macs == conv1.macs * (4 * 8 + 6 * 8 + 4 * 6) / 1024
    fracfx.set_bits(gm, 8, 8, 8)
    assert fracfx.cost_report(gm).ratio_vs_sbm == pytest.approx(1.0)
    fracfx.set_bits(gm, 0, 0, 0)
    assert fracfx.cost_report(gm).ratio_vs_fp32 == pytest.approx(1.0)


def test_cost_report_without_shapes_says_how_to_fix():
    gm = fracfx.transform(SmallNet())
    with pytest.raises(fracfx.ConfigError, match="example_inputs"):
        fracfx.cost_report(gm)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = DataDependent()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing cannot follow it
            return self.lin(x)
        return -self.lin(x)


def test_trace_failure_names_module_and_line_and_fallback_reports_it():
    with pytest.raises(fracfx.UnsupportedGraphError) as info:
        fracfx.transform(Untraceable())
    message = str(info.value)
    assert "'inner' (DataDependent)" in message and "test_api.py" in message and "leaf_modules" in message
    model = Untraceable()
    gm = fracfx.transform(model, fracfx.QuantConfig(trace_fallback=True, keep_fp32=()))
    reported = {op.module_path: op.reason for op in fracfx.fp32_report(gm)}
    assert "inner" in reported and "head" not in reported
    x = torch.randn(3, 4)
    fracfx.set_bits(gm, 0, 0, 0)
    assert torch.equal(gm(x), model(x))
    assert torch.equal(gm(-x), model(-x)), "the leaf keeps its data-dependent branch"
    gm2 = fracfx.transform(Untraceable(), fracfx.QuantConfig(leaf_modules=("inner",), keep_fp32=()))
    assert any(op.module_path == "inner" for op in fracfx.fp32_report(gm2))


def test_config_rejects_bad_values_with_fixes():
    with pytest.raises(fracfx.ConfigError, match="1..16"):
        fracfx.QuantConfig(act_bits=20)
    with pytest.raises(fracfx.ConfigError, match="did you mean 'matmul'"):
        fracfx.QuantConfig(quantize=("matmull",))
    with pytest.raises(fracfx.ConfigError, match="single string"):
        fracfx.QuantConfig(keep_fp32="@last")
    with pytest.raises(fracfx.ConfigError, match="did you mean 'act_bits'"):
        fracfx.QuantConfig.from_dict({"kind": "quant", "version": 1, "act_bit": 4})


class InPlaceAfterConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv2(self.relu(self.conv(x))).relu()


def test_gradient_quantizer_copies_only_for_in_place_consumers():
    gm = fracfx.transform(InPlaceAfterConv(), fracfx.QuantConfig(keep_fp32=()))
    copies = {name: m.copy_output for name, m in gm.named_modules() if isinstance(m, GradQuant)}
    assert sorted(copies.values()) == [False, True], copies  # conv feeds ReLU(inplace), conv2 does not
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    gm(x).sum().backward()  # would raise if the in-place ReLU wrote into a view
    assert torch.isfinite(x.grad).all()
