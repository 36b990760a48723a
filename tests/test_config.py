"""Every config round-trips through to_dict/from_dict (and JSON) unchanged."""

import json

import pytest

from fracfx.config import ALL_CONFIGS, config_from_dict
from fracfx.errors import ConfigError


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_round_trip_through_json(cls):
    config = cls()
    data = json.loads(json.dumps(config.to_dict()))
    assert data["kind"] == cls.KIND and data["version"] >= 1
    assert cls.from_dict(data) == config
    assert config_from_dict(data) == config


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_configs_are_frozen_and_keyword_only(cls):
    config = cls()
    with pytest.raises(Exception):
        config.some_field = 1  # frozen
    with pytest.raises(TypeError):
        cls(8)  # keyword-only


def test_newer_version_and_wrong_kind_are_refused():
    cls = ALL_CONFIGS[0]
    data = cls().to_dict()
    with pytest.raises(ConfigError, match="newer"):
        cls.from_dict(dict(data, version=99))
    with pytest.raises(ConfigError, match="unknown config kind"):
        config_from_dict(dict(data, kind="nope"))
