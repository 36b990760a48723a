"""Training methods: each turns the float model into a Recipe (fracfx.train.recipe).

A method is a Method subclass in its own module here, registered by adding that module to
METHOD_MODULES (the module decorates its class with @register_method). Its Options (name,
parser, default, check) are its settings: CLI flags and TrainConfig.options entries.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

from torch import nn

from fracfx.errors import ConfigError
from fracfx.train.config import Option, did_you_mean
from fracfx.train.recipe import BuildContext, Recipe

METHOD_MODULES: tuple[str, ...] = (
    "fracfx.train.methods.fp32",
    "fracfx.train.methods.static",
    "fracfx.train.methods.pfq",
    "fracfx.train.methods.dfq",
    "fracfx.train.methods.fractrain",
)


class Method:
    """One training recipe. Subclass, set `name`, `help` and `options`, implement build()."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()

    @classmethod
    def resolve_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Every option of this method: the given value (checked, canonical) or its default."""
        known = {o.name: o for o in cls.options}
        for key in given:
            if key not in known:
                raise ConfigError(f"method {cls.name!r} has no option {key!r}{did_you_mean(key, known)}; its options: {sorted(known) or 'none'}")
        values = {name: option.resolve(given.get(name, option.default)) for name, option in known.items()}
        cls.check_options(values)
        return values

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> None:
        """Checks that involve several options (raise ConfigError)."""

    def build(self, model: nn.Module, example_input, context: BuildContext) -> Recipe:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ConfigError(f"{cls.__name__} needs a `name` to be registered")
    METHODS[cls.name] = cls
    return cls


def available_methods() -> dict[str, type[Method]]:
    for module in METHOD_MODULES:
        importlib.import_module(module)  # registers its method (a no-op after the first time)
    rank = {module: index for index, module in enumerate(METHOD_MODULES)}  # built-ins in list order, then the rest
    return dict(sorted(METHODS.items(), key=lambda item: rank.get(item[1].__module__, len(rank))))


def get_method(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}{did_you_mean(name, methods)}; choose from {', '.join(methods)}")
    return methods[name]
