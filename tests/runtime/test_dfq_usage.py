"""DFQUsage: cp against its set-point per iteration and window, stages, the batch's mean bits,
evaluation choices, and its checkpointable state; DFQController.cp records nothing."""

from __future__ import annotations

import json

import pytest
import torch

import fracfx
from fracfx.errors import ConfigError
from fracfx.models.cifar_resnet import cifar_resnet20
from fracfx.runtime import DFQController
from fracfx.runtime.dfq_usage import DFQUsage
from tests.runtime.test_dfq_controller import force

EXAMPLE = torch.randn(2, 3, 16, 16)
CANDIDATES = ((3, 6), (6, 12), "skip")


@pytest.fixture
def gated():
    torch.manual_seed(0)
    gm = fracfx.transform(cifar_resnet20(), fracfx.DFQConfig(candidates=CANDIDATES), example_inputs=EXAMPLE)
    return gm, DFQController(gm, target_ratio=2.0)


def test_cp_is_a_look_that_records_nothing(gated):
    gm, controller = gated
    gm.train()(torch.randn(4, 3, 16, 16))
    cp = controller.cp
    assert controller.cp == cp and controller.last_cp is None
    assert all(sum(counts) == 0 for counts in controller.usage_counts.values())
    assert controller.observe() == cp and all(sum(counts) == 4 for counts in controller.usage_counts.values())
    assert controller.observe() == cp and all(sum(counts) == 4 for counts in controller.usage_counts.values())  # once per forward


def test_steps_record_cp_set_point_stage_and_mean_bits(gated):
    gm, controller = gated
    stage = [0]
    usage = DFQUsage(controller, window=2, stage=lambda: stage[0])
    cps = []
    for index in (0, 1, 0):  # a3g6, a6g12, a3g6 in every block
        force(gm, index)
        gm.train()(torch.randn(4, 3, 16, 16))
        controller.cost_loss()
        cps.append(controller.last_cp)
        usage.step(1.0)
        stage[0] = 1
    assert usage.iteration == 3 and cps[0] == cps[2] < cps[1]
    assert usage.trace == [[2, (cps[0] + cps[1]) / 2, 2.0]]  # one closed window of 2 iterations
    assert usage.cp_trace() == [[2, (cps[0] + cps[1]) / 2, 2.0], [3, cps[2], 2.0]]  # plus the open one
    assert usage.stage_cp() == {"0": {"cp": cps[0], "target": 2.0, "iterations": 1},
                                "1": {"cp": (cps[1] + cps[2]) / 2, "target": 2.0, "iterations": 2}}
    assert usage.last_bits == pytest.approx([3.0, 4.0, 6.0])  # every sample at a3g6, weights at DFQConfig's 4 bits
    assert all(row == {"a3g6": 8, "a6g12": 4, "skip": 0} for row in usage.named(usage.window_usage()).values())

    force(gm, 2)
    with torch.no_grad():
        gm.eval()(torch.randn(5, 3, 16, 16))  # an evaluation: counted apart from training
    assert all(counts == [0, 0, 5] for counts in usage.evaluation_usage().values())
    usage.end_window()
    assert usage.trace == [] and usage.since_eval.iterations == 0 and all(sum(c) == 0 for c in usage.window_usage().values())
    assert all(counts == [0, 0, 5] for counts in usage.last_eval_usage.values())
    assert set(usage.pinned_candidates().values()) == {"skip"}  # the last evaluation's choice


def test_state_round_trips_through_json_and_refuses_other_states(gated):
    gm, controller = gated
    usage = DFQUsage(controller, window=3)
    for _ in range(4):
        gm.train()(torch.randn(4, 3, 16, 16))
        controller.cost_loss()
        usage.step(1.0)
    state = json.loads(json.dumps(usage.state_dict()))
    again = DFQUsage(controller, window=3)
    again.load_state_dict(state)
    assert again.state_dict() == usage.state_dict() and again.cp_trace() == usage.cp_trace()
    legacy = {k: v for k, v in state.items() if k not in ("kind", "version")}  # DFQ checkpoints before the typed object
    again.load_state_dict(legacy)
    assert again.state_dict() == usage.state_dict()
    with pytest.raises(ConfigError, match="not a DFQUsage state"):
        again.load_state_dict({"iteration": 3})
    with pytest.raises(ConfigError, match="another model"):
        again.load_state_dict({**state, "usage_start": {"elsewhere": [0, 0, 0]}})
