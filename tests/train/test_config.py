"""fracfx.train.config: TrainConfig validation, method options, versioned round trips, the plan."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fracfx.errors import ConfigError
from fracfx.train import TrainConfig, available_methods, plan_run
from fracfx.train.config import CONFIG_VERSION, check_same_config


def test_config_round_trips_and_validates():
    config = TrainConfig(method="static", act_bits=4, lr_milestones=[10, 20], keep_fp32=["@first"])
    assert config.options == {"act_bits": 4, "weight_bits": 8, "grad_bits": 8}
    assert config.lr_milestones == (10, 20) and config.keep_fp32 == ("@first",)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config == TrainConfig(method="static", options={"act_bits": 4}, lr_milestones=(10, 20), keep_fp32=("@first",))
    with pytest.raises(ConfigError, match="did you mean 'static'"):
        TrainConfig(method="statik")
    with pytest.raises(ConfigError, match="one entry per stage"):
        TrainConfig(num_bits_schedule=(3, 4, 6, 8), num_grad_bits_schedule=(6, 8))
    with pytest.raises(ConfigError, match="iters must be a positive int"):
        TrainConfig(iters=0)
    with pytest.raises(ConfigError, match="increasing"):
        TrainConfig(lr_milestones=(20, 10))
    with pytest.raises(ConfigError, match="act_bits"):
        TrainConfig(method="static", act_bits=17)
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        TrainConfig.from_dict({"batchsize": 3})
    with pytest.raises(ConfigError, match="given twice"):
        TrainConfig(method="static", act_bits=4, options={"act_bits": 6})
    with pytest.raises(ConfigError, match="option of method static, dfq, fractrain; method 'pfq' does not use it"):
        TrainConfig(method="pfq", act_bits=4)


def test_every_methods_config_round_trips_with_kind_and_version():
    for name, method in available_methods().items():
        config = TrainConfig(method=name, seed=5, window=3)
        data = config.to_dict()
        assert data["kind"] == "fracfx.train" and data["version"] == CONFIG_VERSION
        assert set(data["options"]) == {o.name for o in method.options}
        assert TrainConfig.from_dict(json.loads(json.dumps(data))) == config
    with pytest.raises(ConfigError, match="not a training run"):
        TrainConfig.from_dict({"kind": "quant", "version": 1})
    with pytest.raises(ConfigError, match="newer than this fracfx"):
        TrainConfig.from_dict({"kind": "fracfx.train", "version": CONFIG_VERSION + 1})


def test_version_1_dicts_with_top_level_method_settings_still_load():
    old = {"method": "dfq", "act_bits": 8, "weight_bits": 4, "grad_bits": 8, "num_bits_schedule": [3, 4, 6, 8],
           "num_grad_bits_schedule": [6, 6, 8, 8], "num_turning_point": 3, "initial_threshold": 0.05, "decay": 0.3,
           "options": {"target_ratio": 2.5, "beta": 1e-3, "candidates": "3:6,4:8", "relax": 0.0}, "seed": 2}
    config = TrainConfig.from_dict(old)
    assert config.options["target_ratio"] == 2.5 and config.options["weight_bits"] == 4 and config.seed == 2
    assert "num_bits_schedule" not in config.options


def test_the_frozen_config_is_built_not_patched():
    config = TrainConfig(method="dfq")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3
    assert config.options["weight_bits"] == 4 and TrainConfig(method="static").options["weight_bits"] == 8  # the methods' defaults
    assert config.replace(seed=3).options == config.options


def test_resume_compares_only_the_settings_given():
    saved = TrainConfig(method="pfq", lr=0.2, initial_threshold=0.5)
    check_same_config(saved, TrainConfig(method="pfq"))
    check_same_config(saved, TrainConfig(method="pfq", workers=2))
    with pytest.raises(ConfigError, match="--lr 0.3 differs"):
        check_same_config(saved, TrainConfig(method="pfq", lr=0.3))
    with pytest.raises(ConfigError, match="--initial-threshold 0.7 differs"):
        check_same_config(saved, TrainConfig(method="pfq", initial_threshold=0.7))


def test_plan_defaults_follow_the_reference_and_section_9():
    plan = plan_run(TrainConfig(epochs=3), batches_per_epoch=469)
    assert plan.iterations == 1407
    assert plan.lr_milestones == (703, 1055)  # x0.1 at 50 % and 75 %
    assert plan.window == 47  # about iterations / 30
    assert plan.eval_every == 141  # at least 10 evaluations, at least once per epoch
    plan = plan_run(TrainConfig(iters=64000, lr_milestones=(32000, 48000), window=400), batches_per_epoch=391)
    assert (plan.iterations, plan.lr_milestones, plan.window, plan.eval_every) == (64000, (32000, 48000), 400, 391)
