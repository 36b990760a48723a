"""TrainConfig: everything that defines a training run; Plan: what the run derives from it.

Run-wide settings (data, optimizer, learning rate, evaluation, data-parallel switches, the
language-model size) are fields. Everything that belongs to a training method (bits, PFQ
schedules, the plateau indicator, DFQ's set-point, ...) is one of that method's declared
Options and lives in `TrainConfig.options`, resolved to the method's defaults:

    TrainConfig(method="static", act_bits=4)              # a method option, given flat
    TrainConfig(method="static", options={"act_bits": 4}) # the same config
    config.options["act_bits"]                            # 4; config.options holds every option of the method

The constructor normalizes its arguments before the frozen dataclass is built (sequences to
tuples, options resolved and checked, the task's own defaults), and __post_init__ only checks.
to_dict() carries kind and version; from_dict() also reads version 1 dicts (method settings
as top-level keys).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from typing import Any, Callable, Mapping

from fracfx.errors import ConfigError

CONFIG_KIND = "fracfx.train"
CONFIG_VERSION = 2  # 1: method settings were top-level fields
OPTIMIZERS = ("sgd", "adam")
RESUME_OVERRIDABLE = ("workers", "device")  # may change on resume: they do not change the numbers
_POSITIVE_OR_UNSET = ("iters", "train_subset", "test_subset", "test_batch_size", "window", "eval_every")
_SEQUENCES = ("lr_milestones", "keep_fp32")


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclasses.dataclass(frozen=True)
class Option:
    """A method setting: the CLI flag --<name with hyphens>, TrainConfig.options[name].

    check(value) returns the value in canonical form or raises ConfigError; `type` parses the
    command-line text (with `nargs`, each item).
    """

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    nargs: str | None = None
    check: Callable[[Any, str], Any] | None = None

    def resolve(self, value: Any) -> Any:
        if self.check is not None:
            return self.check(value, self.name)
        if self.nargs is not None:
            return tuple(value)
        return value


class _Normalizing(type):
    """TrainConfig(**arguments) normalizes the arguments, then builds the frozen dataclass."""

    def __call__(cls, **arguments):
        return super().__call__(**cls._normalize(arguments))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(metaclass=_Normalizing):
    """Everything that defines a training run. None means "derive it" (see plan_run())."""

    method: str = "pfq"
    arch: str = "cifar_resnet38"
    dataset: str = "fashion-mnist"
    datadir: str | None = None
    download: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int = 128
    test_batch_size: int | None = None
    iters: int | None = None
    epochs: float | None = None  # used when iters is None; both None -> 3 epochs
    lr: float = 0.1
    lr_milestones: tuple[int, ...] | None = None  # iterations; default 50 % and 75 % of the run
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # "sgd" (docs/method.md section 6) | "adam" (transformers; momentum is then unused)
    window: int | None = None  # iterations per indicator window; default ~ iterations / 30
    keep_fp32: tuple[str, ...] | None = None  # None: QuantConfig's default (@last); language models: the task's
    eval_every: int | None = None  # default: at least once per epoch and 10 times per run
    # language models (--arch transformer_lm on a text --dataset, fracfx.train.tasks); None: the zoo's default
    context: int | None = None  # tokens per sequence
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    save_folder: str = "runs/fracfx"
    seed: int = 0
    workers: int = 0
    device: str = "cpu"
    stochastic_grad: bool = True  # False: round gradients to nearest (deterministic; for comparisons)
    sync_bn: bool = False  # data-parallel runs: BatchNorm statistics over all ranks (runtime/sync_stats.py)
    sync_ranges: bool = False  # data-parallel runs: quantizer ranges over all ranks
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the method's Options, resolved

    @classmethod
    def _normalize(cls, arguments: dict[str, Any]) -> dict[str, Any]:
        from fracfx.train.methods import available_methods, get_method
        from fracfx.train.tasks import task_fields

        fields = {f.name: f for f in dataclasses.fields(cls)}
        method = get_method(arguments.get("method", fields["method"].default))
        given = dict(arguments.get("options") or {})
        values = {}
        for name, value in arguments.items():
            if name in fields:
                values[name] = value
                continue
            owners = [m for m in available_methods().values() if any(o.name == name for o in m.options)]
            if method in owners:
                if name in given:
                    raise ConfigError(f"{name} is given twice, as a keyword and in options; give it once")
                given[name] = value
            elif owners:
                raise ConfigError(f"{name} is an option of method {', '.join(m.name for m in owners)}; method {method.name!r} does not use it")
            else:
                raise ConfigError(f"unknown TrainConfig field {name!r}" + did_you_mean(name, [*fields, *_option_names()]))
        values["options"] = method.resolve_options(given)
        for name in _SEQUENCES:
            value = values.get(name)
            if value is not None:
                if isinstance(value, (str, bytes)):
                    raise ConfigError(f"{name} must be a sequence, not the string {value!r}")
                values[name] = tuple(value)
        whole = {name: values.get(name, f.default if f.default is not dataclasses.MISSING else None) for name, f in fields.items()}
        values.update(task_fields(types.SimpleNamespace(**whole)))  # an image model on text and the like: ConfigError
        return values

    def __post_init__(self):
        from fracfx.train.methods import get_method

        for name in _POSITIVE_OR_UNSET:
            _check_int(getattr(self, name), name, minimum=1, unset_ok=True)
        _check_int(self.batch_size, "batch_size", minimum=1)
        _check_int(self.workers, "workers", minimum=0)
        if self.epochs is not None and not (_is_number(self.epochs) and self.epochs > 0):
            raise ConfigError(f"epochs must be > 0, got {self.epochs!r}")
        for name in ("lr", "lr_gamma"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}{did_you_mean(self.optimizer, OPTIMIZERS)}; choose from {', '.join(OPTIMIZERS)}")
        if not (_is_number(self.momentum) and 0 <= self.momentum < 1 and _is_number(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"momentum must be in [0, 1) and weight_decay >= 0, got {self.momentum!r} and {self.weight_decay!r}")
        for name in ("download", "stochastic_grad", "sync_bn", "sync_ranges"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.lr_milestones is not None and list(self.lr_milestones) != sorted(set(self.lr_milestones)):
            raise ConfigError(f"lr_milestones must be increasing iterations, got {self.lr_milestones}")
        declared = {o.name for o in get_method(self.method).options}
        if set(self.options) != declared:
            raise ConfigError(f"options {sorted(self.options)} are not those of method {self.method!r} ({sorted(declared)})")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": CONFIG_KIND, "version": CONFIG_VERSION}
        for field in dataclasses.fields(self):
            data[field.name] = plain(getattr(self, field.name))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        from fracfx.train.methods import get_method

        data = dict(data)
        kind, version = data.pop("kind", CONFIG_KIND), data.pop("version", 1)
        if kind != CONFIG_KIND:
            raise ConfigError(f"this dict describes a {kind!r} config, not a training run's ({CONFIG_KIND!r})")
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ConfigError(f"TrainConfig version {version!r} is newer than this fracfx ({CONFIG_VERSION}); upgrade fracfx")
        if version == 1:  # every method setting was a top-level key, also those the method did not use
            own = {o.name for o in get_method(data.get("method", "pfq")).options}
            data = {k: v for k, v in data.items() if k in own or k not in _option_names()}
        return cls(**data)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The numbers a run derives from its config and its data (stored in config.json)."""

    iterations: int
    batches_per_epoch: int
    lr_milestones: tuple[int, ...]
    window: int
    eval_every: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def plan_run(config: TrainConfig, batches_per_epoch: int) -> Plan:
    if config.iters is not None:
        iterations = config.iters
    else:
        iterations = max(1, math.ceil((config.epochs if config.epochs is not None else 3) * batches_per_epoch))
    milestones = config.lr_milestones
    if milestones is None:
        milestones = tuple(sorted({max(1, iterations // 2), max(1, iterations * 3 // 4)}))
    window = config.window or max(1, round(iterations / 30))
    eval_every = config.eval_every or max(1, min(batches_per_epoch, math.ceil(iterations / 10)))
    return Plan(iterations, batches_per_epoch, tuple(milestones), window, eval_every)


def check_same_config(saved: TrainConfig, given: TrainConfig) -> None:
    """A resumed run keeps its config: refuse a given setting (not left at its default) that differs."""
    defaults = TrainConfig(method=given.method)
    for field in dataclasses.fields(TrainConfig):
        if field.name in RESUME_OVERRIDABLE:
            continue
        if field.name == "options":
            for key, value in given.options.items():
                if value != defaults.options.get(key) and value != saved.options.get(key):
                    raise ConfigError(f"{_flag(key)} {value!r} differs from the resumed run's {saved.options.get(key)!r}; a resumed run keeps its config")
            continue
        value = getattr(given, field.name)
        if value != getattr(defaults, field.name) and value != getattr(saved, field.name):
            raise ConfigError(
                f"{_flag(field.name)} {value!r} differs from the resumed run's {getattr(saved, field.name)!r}; "
                "a resumed run keeps the config it started with (drop the flag, or start a new run)"
            )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option_names() -> set[str]:
    from fracfx.train.methods import available_methods

    return {o.name for m in available_methods().values() for o in m.options}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(value, name: str, *, minimum: int, unset_ok: bool = False) -> None:
    if value is None and unset_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ConfigError(f"{name} must be {what}{' (or unset)' if unset_ok else ''}, got {value!r}")


def plain(value):
    """Tuples as lists and mappings as dicts, recursively: the JSON form."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
