"""CostMeter and pfq_cost_fraction against hand-computed effective MACs (docs/method.md section 5)."""

import json

import pytest
import torch
from torch import nn

import fracfx
import fracfx.cost_model
from fracfx.errors import ConfigError
from fracfx.runtime import CostMeter, pfq_cost_fraction


def make_model(example=True):
    # Linear(8, 4): 32 MACs per sample, quantized; Linear(4, 2): 8 MACs, kept FP32 (the default @last).
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    config = fracfx.QuantConfig(act_bits=4, weight_bits=4, grad_bits=8)
    return fracfx.transform(model, config, example_inputs=torch.randn(3, 8) if example else None)


# Per sample: quantized op 32 * (a*w + g*w + a*g) / 1024, FP32 op 8 * 3 = 24.
#   (4, 4, 8): 32 * (16 + 32 + 32) / 1024 + 24 = 2.5 + 24 = 26.5
#   (8, 8, 8): 32 * 192 / 1024 + 24 = 6 + 24 = 30
# Baselines per sample: FP32 3 * 40 = 120; static 8-bit 40 * 3 * 64 / 1024 = 7.5.


def test_accumulates_effective_macs_at_the_bits_in_force():
    gm = make_model()
    meter = CostMeter(gm)
    assert meter.per_sample == 26.5
    assert meter.step(10) == 265.0
    fracfx.set_bits(gm, 8, 8, 8)
    assert meter.step(5) == 150.0
    assert (meter.iterations, meter.samples, meter.effective_macs) == (2, 15, 415.0)
    assert meter.fp32_effective_macs == 120.0 * 15 and meter.sbm_effective_macs == 7.5 * 15
    assert meter.ratio_vs_fp32 == 415.0 / 1800.0 and meter.ratio_vs_sbm == 415.0 / 112.5
    assert meter.summary()["effective_macs"] == 415.0


def test_per_sample_cost_is_cached_per_bits_assignment(monkeypatch):
    calls = []
    real = fracfx.cost_model.analyze_cost
    monkeypatch.setattr(fracfx.cost_model, "analyze_cost", lambda gm: calls.append(1) or real(gm))
    gm = make_model()
    meter = CostMeter(gm)
    for _ in range(5):
        meter.step(2)
    fracfx.set_bits(gm, 8, 8, 8)
    for _ in range(5):
        meter.step(2)
    fracfx.set_bits(gm, 4, 4, 8)
    meter.step(2)
    assert len(calls) == 2  # construction (4/4/8) and the first step at 8/8/8
    assert meter.effective_macs == 26.5 * 12 + 30.0 * 10


def test_empty_meter_ratios_are_zero():
    meter = CostMeter(make_model())
    assert meter.ratio_vs_fp32 == 0.0 and meter.ratio_vs_sbm == 0.0


def test_state_dict_round_trip():
    gm = make_model()
    meter = CostMeter(gm)
    meter.step(7)
    resumed = CostMeter(make_model())
    resumed.load_state_dict(json.loads(json.dumps(meter.state_dict())))
    meter.step(3)
    resumed.step(3)
    assert resumed.state_dict() == meter.state_dict() and resumed.effective_macs == 26.5 * 10


def test_load_refuses_another_model():
    state = CostMeter(make_model()).state_dict()
    other = fracfx.transform(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), example_inputs=torch.randn(1, 8))
    with pytest.raises(ConfigError, match="same model"):
        CostMeter(other).load_state_dict(state)
    with pytest.raises(ConfigError, match="CostMeter.state_dict"):
        CostMeter(other).load_state_dict({"samples": 3})


def test_needs_example_inputs_and_a_batch_size():
    with pytest.raises(ConfigError, match="example_inputs"):
        CostMeter(make_model(example=False))
    meter = CostMeter(make_model())
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="batch_size"):
            meter.step(bad)
    assert meter.iterations == 0


def test_pfq_cost_fraction_matches_the_papers_percentages():
    assert pfq_cost_fraction(3, 6) == (9 + 18 + 18) / 3072
    assert pfq_cost_fraction(8, 8) == 0.0625  # static 8/8/8: 6.25 % (docs/method.md section 3)
    assert round(100 * pfq_cost_fraction(8, 16), 2) == 10.42  # FW8/BW16
    assert pfq_cost_fraction(0, None) == 1.0  # FP32 counts as 32 bits
    with pytest.raises(ConfigError):
        pfq_cost_fraction(17, 8)
