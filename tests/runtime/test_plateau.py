"""PlateauIndicator against scripted window losses whose turning points are worked out by hand.

Notation: w5 = window 5 (1-based), S = normalizer, eps = threshold, d = max_j |l_(e-4+j) - l_e| / S.
"""

import json
import math

import pytest

from fracfx.errors import ConfigError
from fracfx.runtime import PlateauIndicator
from tests.runtime.loss_scripts import EXPECTED_THRESHOLDS, EXPECTED_TURNING_WINDOWS, SCRIPT

def scripted_indicator(**overrides):
    settings = dict(num_turning_point=4, initial_threshold=0.25, decay=0.5)
    settings.update(overrides)
    return PlateauIndicator(**settings)


def run(indicator, losses, start_window=1):
    """Window numbers (1-based) that were turning points, and the threshold after each."""
    windows, thresholds = [], []
    for e, loss in enumerate(losses, start=start_window):
        if indicator.update(loss):
            windows.append(e)
            thresholds.append(indicator.threshold)
    return windows, thresholds


def test_script_sanity():
    assert SCRIPT[:10] == [1.0] * 9 + [0.8]
    assert SCRIPT[18] == 0.7 and SCRIPT[22] == 0.7 and SCRIPT[27] == 0.6412 and len(SCRIPT) == 40


def test_scripted_turning_points_thresholds_and_stop_after_n():
    indicator = scripted_indicator()
    windows, thresholds = run(indicator, SCRIPT)
    assert windows == EXPECTED_TURNING_WINDOWS
    assert thresholds == EXPECTED_THRESHOLDS
    assert indicator.stage == 4 and indicator.done and indicator.windows == 40
    assert indicator.normalizer == pytest.approx(0.98, abs=1e-15)


def test_default_decays_at_first_and_second_turning_point_only():
    indicator = PlateauIndicator(initial_threshold=0.25, decay=0.5)  # N = 3, decay at (1, 2)
    assert run(indicator, [1.0] * 30) == ([5, 10, 15], [0.125, 0.0625, 0.0625])


def test_decay_turning_points_is_configurable():
    indicator = PlateauIndicator(initial_threshold=0.25, decay=0.5, decay_turning_points=(2, 3))
    assert run(indicator, [1.0] * 15) == ([5, 10, 15], [0.25, 0.125, 0.0625])
    indicator = PlateauIndicator(initial_threshold=0.25, decay=0.5, decay_turning_points=())
    assert run(indicator, [1.0] * 15)[1] == [0.25, 0.25, 0.25]


def test_fifo_cleared_no_turning_point_within_four_windows_after_one():
    indicator = PlateauIndicator(initial_threshold=1.0, decay=1.0)
    windows, _ = run(indicator, [2.0] * 15)
    assert windows == [5, 10, 15]


def test_normalizer_includes_current_window_before_the_test():
    # w1..w5 = 5, 1, 1, 1, 1. S at the w5 test = 9/5 = 1.8 (with w5), d = 4/1.8 = 2.22.
    # Were S taken before adding w5 (8/4 = 2), d would be 2.0 and eps = 2.1 would switch.
    losses = [5.0, 1.0, 1.0, 1.0, 1.0]
    indicator = PlateauIndicator(initial_threshold=2.1)
    assert run(indicator, losses)[0] == []
    assert indicator.normalizer == 1.8
    assert indicator.last_max_difference == 4.0 / 1.8
    assert run(PlateauIndicator(initial_threshold=2.25), losses)[0] == [5]


def test_normalizer_frozen_after_ten_windows():
    # w1..w10 alternate 1, 3 (d = 2/S >= 1: no TP); S = 20/10 = 2 and then frozen.
    # w11 = 1000 must not move S. w12..w15 = 2, w16 = 2.5: d = 0.5/2 = 0.25 > eps = 0.2: no TP.
    # (An S that kept averaging would be about 92.7 and d about 0.005: a TP at w16.)
    losses = [1.0, 3.0] * 5 + [1000.0] + [2.0] * 4 + [2.5]
    indicator = PlateauIndicator(initial_threshold=0.2)
    windows, _ = run(indicator, losses[:10])
    assert windows == [] and indicator.normalizer == 2.0
    indicator.update(losses[10])
    assert indicator.normalizer == 2.0
    assert run(indicator, losses[11:], start_window=12)[0] == []
    assert indicator.normalizer == 2.0
    assert indicator.last_max_difference == 0.25


def test_equality_switches():
    # S = (2.5 + 1.5 + 2 + 2 + 2)/5 = 2; d = 0.5/2 = 0.25 exactly.
    losses = [2.5, 1.5, 2.0, 2.0, 2.0]
    assert run(PlateauIndicator(initial_threshold=0.25), losses)[0] == [5]
    below = math.nextafter(0.25, 0.0)
    assert run(PlateauIndicator(initial_threshold=below), losses)[0] == []


def test_zero_turning_points_never_switches():
    indicator = PlateauIndicator(num_turning_point=0)
    assert run(indicator, [1.0] * 20)[0] == [] and indicator.done


def test_nan_window_never_switches():
    indicator = PlateauIndicator(initial_threshold=1.0)
    assert run(indicator, [1.0, 1.0, 1.0, 1.0, float("nan")])[0] == []
    assert math.isnan(indicator.last_max_difference)


def test_state_round_trip_mid_fifo_gives_same_future():
    for cut in (3, 5, 12, 19, 26, 33):
        reference = scripted_indicator()
        run(reference, SCRIPT)
        first = scripted_indicator()
        run(first, SCRIPT[:cut])
        resumed = scripted_indicator()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        run(resumed, SCRIPT[cut:], start_window=cut + 1)
        assert resumed.state_dict() == reference.state_dict(), cut


def test_load_refuses_other_settings_and_garbage():
    state = scripted_indicator().state_dict()
    with pytest.raises(ConfigError, match="same settings"):
        scripted_indicator(decay=0.3).load_state_dict(state)
    with pytest.raises(ConfigError, match="state_dict"):
        scripted_indicator().load_state_dict({"version": 1})
    broken = dict(state)
    del broken["fifo"]
    with pytest.raises(ConfigError, match="malformed"):
        scripted_indicator().load_state_dict(broken)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_turning_point": -1}, "num_turning_point"),
        ({"num_turning_point": 2.0}, "num_turning_point"),
        ({"initial_threshold": 0.0}, "initial_threshold"),
        ({"initial_threshold": -0.1}, "initial_threshold"),
        ({"initial_threshold": float("inf")}, "initial_threshold"),
        ({"initial_threshold": True}, "initial_threshold"),
        ({"decay": 0.0}, "decay"),
        ({"decay": 1.5}, "decay"),
        ({"decay_turning_points": 1}, r"e\.g\. \(1, 2\)"),
        ({"decay_turning_points": (0,)}, "numbered from 1"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PlateauIndicator(**kwargs)
