"""PFQScheduler: windows of iterations, bits on a real transformed model, exact resume."""

import json
import weakref

import pytest
import torch
from torch import nn

import fracfx
from fracfx.errors import ConfigError
from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant
from fracfx.runtime import PFQScheduler
from tests.runtime.loss_scripts import EXPECTED_THRESHOLDS, EXPECTED_TURNING_WINDOWS, SCRIPT

FW = (2, 3, 4, 6, 8)
BW = (4, 6, 8, 10, 12)
WINDOW = 4


def make_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    return fracfx.transform(model, fracfx.QuantConfig(keep_fp32=()), example_inputs=torch.randn(2, 3, 8, 8))


def model_bits(gm) -> tuple[int, int, int]:
    """(a, w, g) read from every quantizer of the model; they must agree per kind."""
    found = []
    for kind in (ActQuant, WeightQuant, GradQuant):
        bits = {int(m.bits) for m in gm.modules() if type(m) is kind} | {m.current_bits for m in gm.modules() if type(m) is kind}
        assert len(bits) == 1, (kind, bits)
        found.append(bits.pop())
    return tuple(found)


def iteration_losses(window_losses):
    """Per-iteration losses whose window means are exactly the given ones: (0, 4l, 0, 0) per window.

    4l and 4l/4 are exact in binary floating point; an implementation that looked at single
    losses instead of window means would see zeros.
    """
    for loss in window_losses:
        yield from (0.0, 4.0 * loss, 0.0, 0.0)


def scripted_scheduler(gm):
    return PFQScheduler(gm, FW, BW, num_turning_point=4, initial_threshold=0.25, decay=0.5, window=WINDOW)


def test_bits_applied_at_construction_and_from_the_iteration_after_each_switch():
    gm = make_model()
    assert model_bits(gm) == (8, 8, 8)
    pfq = scripted_scheduler(gm)
    assert model_bits(gm) == (2, 2, 4) and pfq.bits == (2, 2, 4) and pfq.stage == 0

    # Window w closes at iteration 4w, so the turning windows 5, 14, 23, 28 end at iterations
    # 20, 56, 92, 112; iteration i trains at the stage reached after step i - 1.
    switch_iterations = [WINDOW * w for w in EXPECTED_TURNING_WINDOWS]
    assert switch_iterations == [20, 56, 92, 112]
    trained_at, switched_at = [], []
    x = torch.randn(2, 3, 8, 8)
    for i, loss in enumerate(iteration_losses(SCRIPT), start=1):
        trained_at.append(model_bits(gm))
        if pfq.step(loss):
            switched_at.append(i)
            assert pfq.threshold == EXPECTED_THRESHOLDS[len(switched_at) - 1]
    assert switched_at == switch_iterations
    for i, bits in enumerate(trained_at, start=1):
        stage = sum(i > s for s in switch_iterations)
        assert bits == (FW[stage], FW[stage], BW[stage]), i
    assert pfq.turning_points == [(20, 1.0), (56, 0.8), (92, 0.7), (112, 0.6412)]
    assert pfq.iteration == len(SCRIPT) * WINDOW and pfq.stage == 4 and pfq.bits == (8, 8, 12)
    gm(x).sum().backward()  # the model trains at the last stage


def test_defaults_switch_on_a_flat_loss_every_five_windows():
    gm = make_model()
    pfq = PFQScheduler(gm, (3, 4, 6, 8), (6, 6, 8, 8), window=3)
    thresholds = []
    for _ in range(60):
        if pfq.step(1.0):
            thresholds.append(pfq.threshold)
    assert [i for i, _ in pfq.turning_points] == [15, 30, 45]
    assert thresholds == [0.05 * 0.3, 0.05 * 0.3 * 0.3, 0.05 * 0.3 * 0.3]
    assert pfq.normalizer == 1.0 and model_bits(gm) == (8, 8, 8)


def test_weight_schedule_overrides_weights_only():
    gm = make_model()
    pfq = PFQScheduler(gm, (3, 4), (6, 8), num_turning_point=1, window=1, weight_schedule=(4, 6))
    assert model_bits(gm) == (3, 4, 6)
    for _ in range(5):
        pfq.step(1.0)
    assert pfq.stage == 1 and model_bits(gm) == (4, 6, 8) and pfq.bits == (4, 6, 8)


def test_tensor_losses_match_float_losses_and_free_the_graph():
    losses = [1.0 + 0.01 * ((i * 37) % 11) for i in range(200)]
    as_float = PFQScheduler(make_model(), FW, BW, num_turning_point=4, window=7)
    as_tensor = PFQScheduler(make_model(), FW, BW, num_turning_point=4, window=7)
    weight = torch.ones((), requires_grad=True)
    for value in losses:
        loss = weight * value  # a 0-d float32 tensor with a graph behind it
        as_float.step(loss.item())  # the same float32 value, as a Python float
        ref = weakref.ref(loss)
        as_tensor.step(loss)
        del loss  # refcounting frees it at once unless the scheduler kept it
        assert ref() is None
        held = [v for v in vars(as_tensor.tracker).values() if isinstance(v, torch.Tensor)]
        assert not any(v.requires_grad for v in held)  # nor anything tied to its graph
    assert as_float.turning_points and as_tensor.state_dict() == as_float.state_dict()


@pytest.mark.parametrize("cut", [1, 19, 20, 22, 57, 61, 93, 111, 150])
def test_state_dict_round_trip_mid_window_gives_identical_future(cut):
    losses = list(iteration_losses(SCRIPT))
    # Non-exact per-iteration values so the carried partial window sum matters to the last bit.
    losses = [v + 1e-3 * ((i * 7919) % 13) / 13 for i, v in enumerate(losses)]
    reference = scripted_scheduler(make_model())
    for loss in losses:
        reference.step(loss)
    first = scripted_scheduler(make_model())
    for loss in losses[:cut]:
        first.step(loss)
    state = json.loads(json.dumps(first.state_dict()))  # plain data only
    resumed_model = make_model()
    resumed = scripted_scheduler(resumed_model)
    resumed.load_state_dict(state)
    assert model_bits(resumed_model) == resumed.bits == first.bits  # load re-applies the bits
    for loss in losses[cut:]:
        resumed.step(loss)
    assert resumed.turning_points == reference.turning_points
    assert resumed.state_dict() == reference.state_dict()
    assert len(reference.turning_points) == 4


def test_load_state_dict_checks_schedules():
    state = scripted_scheduler(make_model()).state_dict()
    other = PFQScheduler(make_model(), (2, 3, 4, 6, 7), BW, num_turning_point=4, initial_threshold=0.25, decay=0.5, window=WINDOW)
    with pytest.raises(ConfigError, match="same settings"):
        other.load_state_dict(state)
    wider = PFQScheduler(make_model(), FW, BW, num_turning_point=4, initial_threshold=0.25, decay=0.5, window=8)
    with pytest.raises(ConfigError, match="window"):
        wider.load_state_dict(state)
    with pytest.raises(ConfigError, match="PFQScheduler.state_dict"):
        other.load_state_dict({"stage": 2})


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (((3, 4, 6), (6, 6, 8)), {}, "needs 4"),  # shorter than N + 1
        (((3, 4, 6, 8), (6, 6, 8)), {}, "one entry per stage"),
        (((3, 4, 0, 8), (6, 6, 8, 8)), {}, "keep_fp32"),
        (((3, 4, None, 8), (6, 6, 8, 8)), {}, "keep_fp32"),
        (((3, 4, 6, 17), (6, 6, 8, 8)), {}, "1..16"),
        (((3, 4, 6, 8.0), (6, 6, 8, 8)), {}, "int"),
        ((8, (6, 6, 8, 8)), {}, "sequence of bit widths"),
        (("3468", (6, 6, 8, 8)), {}, "sequence of bit widths"),
        (((3, 4, 6, 8), (6, 6, 8, 8)), {"weight_schedule": 4}, r"\(4,\) \* 4"),
        (((3, 4, 6, 8), (6, 6, 8, 8)), {"weight_schedule": (4, 4)}, "one entry per stage"),
        (((3, 4, 6, 8), (6, 6, 8, 8)), {"window": 0}, "iterations per window"),
        (((3, 4, 6, 8), (6, 6, 8, 8)), {"window": 2.5}, "window"),
        (((3, 4, 6, 8), (6, 6, 8, 8)), {"initial_threshold": 0}, "initial_threshold"),
        (((3, 4, 6, 8), (6, 6, 8, 8)), {"decay": 0}, "decay"),
        (((3, 4, 6, 8), (6, 6, 8, 8)), {"decay": 1.01}, "decay"),
        (((3, 4, 6, 8), (6, 6, 8, 8)), {"num_turning_point": -1}, "num_turning_point"),
    ],
)
def test_bad_arguments_raise_config_error(args, kwargs, message):
    gm = make_model()
    with pytest.raises(ConfigError, match=message):
        PFQScheduler(gm, *args, **kwargs)
    assert model_bits(gm) == (8, 8, 8)  # a refused scheduler leaves the model alone


def test_needs_a_transformed_model():
    with pytest.raises(ConfigError, match="fracfx.transform"):
        PFQScheduler(nn.Linear(2, 2), (3, 4, 6, 8), (6, 6, 8, 8))


def test_step_rejects_non_scalar_losses():
    pfq = PFQScheduler(make_model(), (3, 4, 6, 8), (6, 6, 8, 8))
    with pytest.raises(ConfigError, match=r"loss\.mean\(\)"):
        pfq.step(torch.ones(3))
    with pytest.raises(ConfigError, match="float or a 0-d tensor"):
        pfq.step("1.0")
    assert pfq.iteration == 0
    pfq.step(torch.ones(1))  # one element is a scalar too
    assert pfq.iteration == 1
