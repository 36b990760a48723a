"""Frozen, validated, versioned configurations.

Every config is a keyword-only frozen dataclass that validates in __post_init__ (ConfigError, a
ValueError, naming the field and the fix) and round-trips through to_dict/from_dict. The dict
carries `kind` and `version` so a checkpoint written today still loads when fields are added.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, ClassVar

from fracfx.bits import check_bits
from fracfx.errors import ConfigError

CONFIG_VERSION = 1
QUANTIZABLE_KINDS = ("conv", "linear", "matmul")
FIRST_LAYER = "@first"  # keep_fp32 shortcut: the first quantizable op in execution order
LAST_LAYER = "@last"  # keep_fp32 shortcut: the last quantizable op in execution order


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _as_str_tuple(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ConfigError(f"{what} must be a sequence of strings, not a single string; write ({value!r},)")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{what} must contain strings, got {item!r}")
    return items


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Config:
    """Shared to_dict/from_dict; subclasses set KIND and validate themselves."""

    KIND: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": self.KIND, "version": CONFIG_VERSION}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            data[field.name] = _to_json(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        kind = data.pop("kind", cls.KIND)
        version = data.pop("version", CONFIG_VERSION)
        if kind != cls.KIND:
            raise ConfigError(f"this dict describes a {kind!r} config, not {cls.KIND!r}; use the matching class")
        if version > CONFIG_VERSION:
            raise ConfigError(f"config version {version} is newer than this fracfx ({CONFIG_VERSION}); upgrade fracfx")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown {cls.__name__} field {key!r}{_did_you_mean(key, names)}")
        return cls(**{k: _from_json(v) for k, v in data.items()})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _to_json(value):
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def _from_json(value):
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig(_Config):
    """Static (and PFQ-ready) quantization: which ops, at which bits.

    keep_fp32: module-name globs (fnmatch, e.g. "layer4.*") of ops to leave in FP32, plus the
    shortcuts "@first" and "@last" for the first and last quantizable op. The default keeps the
    final classifier in FP32, as the paper does; `keep_fp32=()` quantizes every supported op.
    """

    KIND: ClassVar[str] = "quant"

    act_bits: int | None = 8
    weight_bits: int | None = 8
    grad_bits: int | None = 8
    keep_fp32: tuple[str, ...] = (LAST_LAYER,)
    quantize: tuple[str, ...] = QUANTIZABLE_KINDS
    act_momentum: float = 0.9
    stochastic_grad: bool = True
    leaf_modules: tuple[str, ...] = ()
    trace_fallback: bool = False

    def __post_init__(self):
        for name in ("act_bits", "weight_bits", "grad_bits"):
            object.__setattr__(self, name, check_bits(getattr(self, name), name))
        object.__setattr__(self, "keep_fp32", _as_str_tuple(self.keep_fp32, "keep_fp32"))
        object.__setattr__(self, "leaf_modules", _as_str_tuple(self.leaf_modules, "leaf_modules"))
        kinds = _as_str_tuple(self.quantize, "quantize")
        for kind in kinds:
            if kind not in QUANTIZABLE_KINDS:
                raise ConfigError(f"quantize: unknown op kind {kind!r}{_did_you_mean(kind, QUANTIZABLE_KINDS)}; choose from {QUANTIZABLE_KINDS}")
        object.__setattr__(self, "quantize", kinds)
        if not (isinstance(self.act_momentum, (int, float)) and 0.0 <= self.act_momentum < 1.0):
            raise ConfigError(f"act_momentum must be in [0, 1), got {self.act_momentum!r}")
        if not isinstance(self.stochastic_grad, bool):
            raise ConfigError(f"stochastic_grad must be True or False, got {self.stochastic_grad!r}")


ALL_CONFIGS: tuple[type[_Config], ...] = (QuantConfig,)


def config_from_dict(data: dict[str, Any]) -> _Config:
    """Rebuild any fracfx config from its to_dict() form, dispatching on `kind`."""
    kinds = {c.KIND: c for c in ALL_CONFIGS}
    kind = data.get("kind")
    if kind not in kinds:
        raise ConfigError(f"unknown config kind {kind!r}{_did_you_mean(str(kind), kinds)}; known: {sorted(kinds)}")
    return kinds[kind].from_dict(data)
