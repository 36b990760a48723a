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
from fracfx.meta import QUANTIZABLE_KINDS

CONFIG_VERSION = 1
FIRST_LAYER = "@first"  # keep_fp32 shortcut: the first quantizable op in execution order
LAST_LAYER = "@last"  # keep_fp32 shortcut: the last quantizable op in execution order
CAPTURE_MODES = ("auto", "fx", "export")  # QuantConfig.capture / DFQConfig.capture


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


def _check_shared_fields(config) -> None:
    """Validate the fields QuantConfig and DFQConfig both have (quantize, act_momentum, ...)."""
    kinds = _as_str_tuple(config.quantize, "quantize")
    for kind in kinds:
        if kind not in QUANTIZABLE_KINDS:
            raise ConfigError(f"quantize: unknown op kind {kind!r}{_did_you_mean(kind, QUANTIZABLE_KINDS)}; choose from {QUANTIZABLE_KINDS}")
    object.__setattr__(config, "quantize", kinds)
    if not (isinstance(config.act_momentum, (int, float)) and 0.0 <= config.act_momentum < 1.0):
        raise ConfigError(f"act_momentum must be in [0, 1), got {config.act_momentum!r}")
    if not isinstance(config.stochastic_grad, bool):
        raise ConfigError(f"stochastic_grad must be True or False, got {config.stochastic_grad!r}")
    if config.capture not in CAPTURE_MODES:
        raise ConfigError(f"capture={config.capture!r} is not a capture mode{_did_you_mean(str(config.capture), CAPTURE_MODES)}; choose from {CAPTURE_MODES}")
    if not isinstance(config.replace_attention, bool):
        raise ConfigError(f"replace_attention must be True or False, got {config.replace_attention!r}")


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

    integer_zero_point: train on the grid ONNX can express (lo = -zp * s with an integer zp, see
    fracfx.nn.quant.integer_grid) instead of docs/method.md's real-valued lo, so that the exported
    model computes what was trained (export otherwise nudges lo by up to half a step).

    capture: how the model becomes a graph. "fx" is torch.fx symbolic tracing (module calls
    kept as nodes; any batch size afterwards); "export" is torch.export (non-strict, an ATen-level
    graph specialised to the example inputs' shapes; needs example_inputs); "auto" traces with fx
    and uses torch.export only where the model's own forward cannot be traced (Hugging Face
    models: keyword inputs, output dataclasses, control flow on the config).
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
    replace_attention: bool = True  # open nn.MultiheadAttention into quantizable linears/matmuls
    integer_zero_point: bool = False
    capture: str = "auto"  # "fx" symbolic tracing, "export" torch.export (ATen graph), "auto" fx then export

    def __post_init__(self):
        if not isinstance(self.integer_zero_point, bool):
            raise ConfigError(f"integer_zero_point must be True or False, got {self.integer_zero_point!r}")
        for name in ("act_bits", "weight_bits", "grad_bits"):
            object.__setattr__(self, name, check_bits(getattr(self, name), name))
        object.__setattr__(self, "keep_fp32", _as_str_tuple(self.keep_fp32, "keep_fp32"))
        object.__setattr__(self, "leaf_modules", _as_str_tuple(self.leaf_modules, "leaf_modules"))
        _check_shared_fields(self)


SKIP = "skip"  # DFQ candidate: the block's output is its shortcut (cost 0)
FP32_CANDIDATE = "fp32"  # DFQ candidate: the block's ops run unquantized, weights included (cost 1)
EMBED_LAYOUTS = ("auto", "channels_first", "tokens")  # DFQConfig.embed_layout (see fracfx/nn/gates.py)
CIFAR_CANDIDATES = ((3, 6), (4, 6), (4, 8), (6, 8), (6, 12))
IMAGENET_CANDIDATES = ((3, 6), (4, 8), (6, 12), (8, 16))


def _check_candidate(value, index: int):
    """Canonical form of one DFQ candidate: "skip", "fp32" or an (act_bits, grad_bits) pair."""
    what = f"candidates[{index}]"
    if isinstance(value, str):
        if value in (SKIP, FP32_CANDIDATE):
            return value
        raise ConfigError(f"{what}={value!r} is not a candidate{_did_you_mean(value, (SKIP, FP32_CANDIDATE))}; "
                          f"use an (act_bits, grad_bits) pair, {SKIP!r} or {FP32_CANDIDATE!r}")
    try:
        a, g = value
    except (TypeError, ValueError):
        raise ConfigError(f"{what}={value!r} must be an (act_bits, grad_bits) pair such as (4, 8), or {SKIP!r} / {FP32_CANDIDATE!r}") from None
    pair = (check_bits(a, f"{what} act_bits"), check_bits(g, f"{what} grad_bits"))
    return FP32_CANDIDATE if pair == (0, 0) else pair


def _check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive int, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class DFQConfig(_Config):
    """Dynamic fractional quantization: a recurrent gate picks per sample and per block one
    candidate precision (docs/method.md section 3).

    candidates: each is an (act_bits, grad_bits) pair (weights use `weight_bits`; 0 in a pair
    means that tensor stays FP32), or "skip" (the block's output is its shortcut, cost 0), or
    "fp32" (activations, weights and gradients unquantized for that sample, cost 1; (0, 0) is
    read as "fp32"). Gated blocks are found automatically (residual blocks: a module whose
    traced body ends in an add of its residual branch and its input or a projection of it, or in
    a chain of residual adds over its input, as a transformer layer: one gate per layer);
    block_types (class names) or block_globs (module-name globs) replace that detection.
    Quantized ops outside every gated block run at the static ungated_act_bits/ungated_grad_bits.
    embed_dims: widths of the layers embedding each block input (ReLU between them): 1x1 convs
    after global average pooling for channels-first feature maps (B, C, H, W), linears after the
    mean over tokens for token activations (B, T, C); hidden: the shared LSTM's hidden size.
    embed_layout: "auto" reads each block input where the block's first conv/linear/matmul reads
    its features (a conv: channels at dim 1; a linear or matmul: the last dim, tokens before it);
    "channels_first" or "tokens" force one layout for every block (see fracfx/nn/gates.py).
    """

    KIND: ClassVar[str] = "dfq"

    weight_bits: int | None = 4
    candidates: tuple = CIFAR_CANDIDATES
    keep_fp32: tuple[str, ...] = (FIRST_LAYER, LAST_LAYER)
    embed_dims: tuple[int, ...] = (32, 16)
    hidden: int = 16
    block_types: tuple[str, ...] = ()
    block_globs: tuple[str, ...] = ()
    ungated_act_bits: int | None = 8
    ungated_grad_bits: int | None = 8
    quantize: tuple[str, ...] = QUANTIZABLE_KINDS
    act_momentum: float = 0.9
    stochastic_grad: bool = True
    leaf_modules: tuple[str, ...] = ()
    trace_fallback: bool = False
    replace_attention: bool = True  # as in QuantConfig
    embed_layout: str = "auto"
    capture: str = "auto"  # as in QuantConfig

    def __post_init__(self):
        if self.embed_layout not in EMBED_LAYOUTS:
            raise ConfigError(f"embed_layout={self.embed_layout!r} is not a layout{_did_you_mean(str(self.embed_layout), EMBED_LAYOUTS)}; choose from {EMBED_LAYOUTS}")
        for name in ("weight_bits", "ungated_act_bits", "ungated_grad_bits"):
            object.__setattr__(self, name, check_bits(getattr(self, name), name))
        if isinstance(self.candidates, (str, bytes)) or not hasattr(self.candidates, "__iter__"):
            raise ConfigError(f"candidates must be a sequence of candidates, got {self.candidates!r}; e.g. ((4, 8), (6, 12), 'skip')")
        candidates = tuple(_check_candidate(c, i) for i, c in enumerate(self.candidates))
        if not candidates:
            raise ConfigError("candidates is empty; give at least one, e.g. ((3, 6), (4, 8), (6, 12))")
        for i, c in enumerate(candidates):
            if c in candidates[:i]:
                raise ConfigError(f"candidates[{i}]={c!r} repeats an earlier entry; list each candidate once")
        object.__setattr__(self, "candidates", candidates)
        for name in ("keep_fp32", "block_types", "block_globs", "leaf_modules"):
            object.__setattr__(self, name, _as_str_tuple(getattr(self, name), name))
        if isinstance(self.embed_dims, (str, bytes, int)) or not self.embed_dims:
            raise ConfigError(f"embed_dims must be a non-empty sequence of widths, got {self.embed_dims!r}; e.g. (32, 16) or (40,)")
        object.__setattr__(self, "embed_dims", tuple(_check_positive_int(d, "each embed_dims entry") for d in self.embed_dims))
        _check_positive_int(self.hidden, "hidden")
        _check_shared_fields(self)


ALL_CONFIGS: tuple[type[_Config], ...] = (QuantConfig, DFQConfig)


def config_from_dict(data: dict[str, Any]) -> _Config:
    """Rebuild any fracfx config from its to_dict() form, dispatching on `kind`."""
    kinds = {c.KIND: c for c in ALL_CONFIGS}
    kind = data.get("kind")
    if kind not in kinds:
        raise ConfigError(f"unknown config kind {kind!r}{_did_you_mean(str(kind), kinds)}; known: {sorted(kinds)}")
    return kinds[kind].from_dict(data)
