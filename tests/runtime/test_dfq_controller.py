"""DFQController (cost term, cp, usage, state) and FracTrainScheduler."""

import json

import pytest
import torch
from torch import nn

import fracfx
from fracfx.config import CIFAR_CANDIDATES, IMAGENET_CANDIDATES
from fracfx.errors import ConfigError
from fracfx.nn.gates import GateChoice
from fracfx.models.cifar_resnet import cifar_resnet20
from fracfx.runtime import DFQController, FracTrainScheduler


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is ~100x faster than two on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


EXAMPLE = torch.randn(2, 3, 16, 16)


def dfq(model, **options):
    return fracfx.transform(model, fracfx.DFQConfig(**options), example_inputs=EXAMPLE)


def force(gm, index):
    head = gm.get_submodule("fracfx_gate.head")
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[index] = 10.0


def block_macs(model):
    """MACs per sample of the convs in each residual block of a CIFAR ResNet, from hooks."""
    macs, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and name.startswith("layer"):
            block = ".".join(name.split(".")[:2])
            def hook(m, inputs, out, block=block):
                macs[block] = macs.get(block, 0) + out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(EXAMPLE[:1])
    for h in hooks:
        h.remove()
    return macs


def gate_masks(gm):
    return [m.last_mask for m in gm.modules() if isinstance(m, GateChoice)]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = cifar_resnet20()
    return model, dfq(model, candidates=CIFAR_CANDIDATES + ("skip", "fp32"))


def test_cp_of_every_candidate_matches_the_fractrain_table(resnet):
    _, gm = resnet
    controller = DFQController(gm, target_ratio=3.0)
    for index, expected in enumerate([1.758, 2.083, 2.604, 3.385, 4.688, 0.0, 100.0]):
        force(gm, index)
        gm.train()(torch.randn(2, 3, 16, 16))
        assert controller.cp == pytest.approx(expected, abs=5e-4), index
    imagenet = dfq(cifar_resnet20(), weight_bits=6, candidates=IMAGENET_CANDIDATES)
    controller = DFQController(imagenet, target_ratio=3.0)
    for index, expected in enumerate([2.344, 3.385, 5.859, 8.854]):
        force(imagenet, index)
        imagenet(torch.randn(1, 3, 16, 16))
        assert controller.cp == pytest.approx(expected, abs=5e-4), index


def bitops(candidate, w=4):
    a, g = candidate
    return a * w + g * w + a * g


def test_mixed_choices_cost_uses_real_macs_and_the_actual_batch(resnet):
    model, _ = resnet
    gm = dfq(model)
    with torch.no_grad():
        gm.get_submodule("fracfx_gate.head").weight.mul_(300.0)
    x = torch.randn(5, 3, 16, 16) * torch.arange(1, 6).view(5, 1, 1, 1)
    gm.train()(x)
    controller = DFQController(gm, target_ratio=0.0)
    macs = block_macs(model)
    assert macs["layer2.0"] != macs["layer1.0"]  # blocks are not weighted equally
    total = 0.0
    for block, mask in zip(sorted(macs), gate_masks(gm)):
        total += sum(macs[block] * bitops(CIFAR_CANDIDATES[k]) for k in mask.argmax(1).tolist())
    expected = 100 * total / (5 * 3 * 1024 * sum(macs.values()))
    assert controller.cp == pytest.approx(expected, rel=1e-6)
    assert controller.total_macs == sum(macs.values())


def test_cost_loss_sign_band_and_gradient_through_the_masks(resnet):
    model, _ = resnet
    gm = dfq(model)
    force(gm, 2)  # (4, 8): cp = 2.604
    gm.train()(torch.randn(2, 3, 16, 16))
    masks = gate_masks(gm)
    for mask in masks:
        mask.retain_grad()
    controller = DFQController(gm, target_ratio=3.0, beta=1e-3)
    loss = controller.cost_loss()
    loss.backward(retain_graph=True)
    macs = block_macs(model)
    scale = -1e-3 / (1024 * sum(macs.values()) / len(macs))  # r = -1 below the target
    for block, mask in zip(sorted(macs), masks):
        expected = torch.tensor([scale * macs[block] * bitops(c) for c in CIFAR_CANDIDATES])
        assert torch.allclose(mask.grad, expected.expand(2, 5), rtol=1e-5)
    # value: r * beta * C / (1024 * mean block MACs), C summed over samples
    assert loss.item() == pytest.approx(scale * 2 * sum(macs.values()) * bitops((4, 8)), rel=1e-5)
    assert DFQController(gm, target_ratio=2.0).cost_loss().item() == pytest.approx(-loss.item(), rel=1e-6)
    assert DFQController(gm, target_ratio=2.604, relax=0.5).cost_loss().item() == 0.0
    banded = DFQController(gm, target_ratio=2.5, relax=0.5, band_sign=0.1).cost_loss().item()
    assert banded == pytest.approx(-0.1 * loss.item(), rel=1e-6)


def test_usage_counts_and_state_dict_round_trip(resnet):
    _, gm = resnet
    controller = DFQController(gm, target_ratio=3.0)
    force(gm, 3)
    gm(torch.randn(3, 3, 16, 16))
    controller.cost_loss()
    controller.cost_loss()  # the same forward is counted once
    force(gm, 5)
    gm(torch.randn(1, 3, 16, 16))
    controller.observe()
    usage = controller.usage
    assert list(usage) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert all(u == {"a3g6": 0, "a4g6": 0, "a4g8": 0, "a6g8": 3, "a6g12": 0, "skip": 1, "fp32": 0} for u in usage.values())
    state = json.loads(json.dumps(controller.state_dict()))
    controller.target_ratio = 4.5
    fresh = DFQController(gm, target_ratio=1.0)
    fresh.load_state_dict(state)
    assert fresh.usage == usage and fresh.target_ratio == 3.0 and fresh.last_cp == 0.0
    with pytest.raises(ConfigError, match="beta"):
        DFQController(gm, target_ratio=1.0, beta=1.0).load_state_dict(state)
    fresh.reset_usage()
    assert all(sum(u.values()) == 0 for u in fresh.usage.values())


def test_fractrain_raises_the_target_at_each_plateau(resnet):
    _, gm = resnet
    controller = DFQController(gm, target_ratio=1.5)
    scheduler = FracTrainScheduler(controller, target_ratio_step=0.5, window=2, initial_threshold=0.05)
    targets = []
    for _ in range(40):
        scheduler.step(1.0)  # a flat loss: a turning point every 5 windows (10 iterations), 3 in all
        targets.append(controller.target_ratio)
    # the switch decided at iteration 10 (index 9) is in force from iteration 11 on
    assert targets[8:10] == [1.5, 2.0] and targets[18:20] == [2.0, 2.5] and targets[28:30] == [2.5, 3.0]
    assert targets[-1] == 3.0 and scheduler.stage == 3
    state = json.loads(json.dumps(scheduler.state_dict()))
    resumed = FracTrainScheduler(DFQController(gm, target_ratio=1.5), target_ratio_step=0.5, window=2)
    resumed.load_state_dict(state)
    assert resumed.stage == 3 and resumed.controller.target_ratio == 3.0


def test_errors_say_what_to_do():
    static = fracfx.transform(cifar_resnet20(), fracfx.QuantConfig(), example_inputs=EXAMPLE)
    with pytest.raises(ConfigError, match="DFQConfig"):
        DFQController(static, target_ratio=3.0)
    gm = dfq(cifar_resnet20())
    with pytest.raises(ConfigError, match="forward"):
        DFQController(gm, target_ratio=3.0).cost_loss()
    with pytest.raises(ConfigError, match="target_ratio"):
        DFQController(gm, target_ratio=float("nan"))


def _gate_toy(bias: list[float], set_points: list[float], **gains) -> list[float]:
    """A controlled toy: ResNet-8's gates with only the shared head's bias trainable (every sample
    gets the same softmax, so cp is one candidate's cost; the cheapest is 1.758 %), plain SGD at
    lr 100 on the cost term alone, one iteration per entry of set_points; the cp of each."""
    from fracfx.models.cifar_resnet import cifar_resnet8

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    gm = fracfx.transform(cifar_resnet8(), fracfx.DFQConfig(), example_inputs=x[:2])
    for parameter in gm.parameters():
        parameter.requires_grad_(False)
    head = gm.get_submodule("fracfx_gate.head")
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor(bias))
    head.bias.requires_grad_(True)
    controller = DFQController(gm, target_ratio=set_points[0], **gains)
    optimizer = torch.optim.SGD([head.bias], lr=100.0)
    cps = []
    for target in set_points:
        controller.target_ratio = target
        gm(x)
        loss = controller.cost_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        cps.append(controller.last_cp)
    return cps


def _step_response(error_gain: float) -> list[float]:
    """Settled on the cheapest candidate when the set-point steps to 3.0 for 100 iterations."""
    return _gate_toy([2.0, 0.0, 0.0, 0.0, 0.0], [3.0] * 100, error_gain=error_gain)


def test_error_gain_follows_a_set_point_step_within_the_first_tenth():
    """The paper's rule (error_gain 0) stays on the cheapest candidate for the first tenth of a
    100-iteration stage after the set-point rose from below 1.758 to 3.0; error_gain 20 reaches
    the set-point's neighbourhood within it and then hovers around it."""
    paper, fast = _step_response(0.0), _step_response(20.0)
    assert max(paper[:10]) == pytest.approx(1.7578125, abs=1e-3)
    assert max(fast[:10]) >= 2.5
    assert abs(sum(fast[10:]) / 90 - 3.0) < 0.25 and sum(paper[10:]) / 90 < 2.5


def _two_stage_response(**gains) -> list[float]:
    """From a uniform gate, as FracTrain runs it: 100 iterations at a set-point below the cheapest
    candidate (1.5 < 1.758: unreachable), then 100 at a raised one (3.0)."""
    return _gate_toy([0.0] * 5, [1.5] * 100 + [3.0] * 100, **gains)


def test_raise_gain_follows_a_raised_set_point_after_an_unreachable_one():
    """error_gain multiplies the push towards the cheapest candidate for the whole unreachable
    first stage and the saturated gate then lags the raised set-point (as in the Fashion-MNIST
    sweep); raise_gain amplifies only the pull upwards and reaches it within the first tenth."""
    paper, error, raised = _two_stage_response(), _two_stage_response(error_gain=20.0), _two_stage_response(raise_gain=20.0)
    for cps in (paper, error, raised):
        assert cps[99] == pytest.approx(1.7578125, abs=1e-3)  # stage 0 ends on the cheapest candidate
    assert max(paper[100:110]) < 1.8 and max(error[100:110]) < 1.8
    assert max(raised[100:110]) >= 2.5
    assert abs(sum(raised[110:]) / 90 - 3.0) < 0.5 and sum(paper[110:]) / 90 < 2.0


def test_error_gain_scales_the_cost_term_and_is_checked_on_resume(resnet):
    _, gm = resnet
    force(gm, 4)  # a6g12: cp 4.6875
    gm(EXAMPLE)
    plain, gained = DFQController(gm, target_ratio=3.0), DFQController(gm, target_ratio=3.0, error_gain=2.0)
    ratio = float(gained.cost_loss().detach()) / float(plain.cost_loss().detach())
    assert ratio == pytest.approx(1 + 2.0 * (4.6875 - 3.0), rel=1e-5)
    assert "error_gain" not in plain.state_dict()  # the paper's rule keeps the earlier checkpoint form
    state = json.loads(json.dumps(gained.state_dict()))
    DFQController(gm, target_ratio=3.0, error_gain=2.0).load_state_dict(state)
    with pytest.raises(ConfigError, match="error_gain"):
        DFQController(gm, target_ratio=3.0).load_state_dict(state)
    with pytest.raises(ConfigError, match="error_gain"):
        DFQController(gm, target_ratio=3.0, error_gain=1.0).load_state_dict(state)
    with pytest.raises(ConfigError, match="error_gain"):
        DFQController(gm, target_ratio=3.0, error_gain=-1.0)
    below = DFQController(gm, target_ratio=6.0, raise_gain=2.0)  # cp 4.6875 < 6: scaled
    assert float(below.cost_loss().detach()) / float(DFQController(gm, target_ratio=6.0).cost_loss().detach()) == pytest.approx(1 + 2.0 * (6.0 - 4.6875), rel=1e-5)
    above = DFQController(gm, target_ratio=3.0, raise_gain=2.0)  # cp above the set-point: the paper's term
    assert float(above.cost_loss().detach()) == pytest.approx(float(plain.cost_loss().detach()), rel=1e-6)
    with pytest.raises(ConfigError, match="raise_gain"):
        DFQController(gm, target_ratio=3.0).load_state_dict(json.loads(json.dumps(above.state_dict())))
