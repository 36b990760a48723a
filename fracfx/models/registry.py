"""Build a model by name: the fracfx zoo, any torchvision classification model, or `pkg.mod:factory`.

    build_model("cifar_resnet38", num_classes=100)
    build_model("resnet18", in_channels=1)             # torchvision, weights=None
    build_model("vit_b_16", image_size=32)              # extra kwargs go to the constructor
    build_model("my_project.nets:make_net")             # any importable factory

Names that resolve to nothing raise ConfigError with the closest known names.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from typing import Any, Callable

from torch import nn

from fracfx.errors import ConfigError
from fracfx.models.cifar_mobilenet_v2 import cifar_mobilenet_v2
from fracfx.models.cifar_resnet import cifar_resnet8, cifar_resnet14, cifar_resnet20, cifar_resnet38, cifar_resnet74
from fracfx.models.transformer_lm import transformer_lm_zoo

DEFAULT_NUM_CLASSES = 10
DEFAULT_IN_CHANNELS = 3
TORCHVISION_INPUT_SIZE = (224, 224)
FACTORY_INPUT_SIZE = (224, 224)  # a guess for `pkg.mod:factory` models; the CLI's --input-size overrides it
_TORCHVISION_SPECIAL_SIZES = {"inception_v3": (299, 299)}
# torchvision models whose constructor fixes the input size: name prefix -> the keyword for it
_TORCHVISION_SIZE_KWARGS = {"vit_": "image_size", "maxvit_": "input_size"}


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    factory: Callable[..., nn.Module]
    input_size: tuple[int, int]


ZOO: dict[str, ZooEntry] = {
    "cifar_resnet8": ZooEntry(cifar_resnet8, (32, 32)),
    "cifar_resnet14": ZooEntry(cifar_resnet14, (32, 32)),
    "cifar_resnet20": ZooEntry(cifar_resnet20, (32, 32)),
    "cifar_resnet38": ZooEntry(cifar_resnet38, (32, 32)),
    "cifar_resnet74": ZooEntry(cifar_resnet74, (32, 32)),
    "cifar_mobilenet_v2": ZooEntry(cifar_mobilenet_v2, (32, 32)),
    # num_classes = vocabulary size; input is (batch, tokens) ids, here (1, default context)
    "transformer_lm": ZooEntry(transformer_lm_zoo, (1, 128)),
}


def torchvision_models() -> list[str]:
    """Names of torchvision's classification models (detection, video etc. are not included)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def list_models(*, include_torchvision: bool = True) -> list[str]:
    """Every name build_model() accepts (besides `pkg.mod:factory`): the zoo first, then torchvision."""
    names = list(ZOO)
    if include_torchvision:
        names += torchvision_models()
    return names


def default_input_size(name: str) -> tuple[int, int]:
    """(height, width) the model is designed for: 32x32 for the CIFAR zoo, 224 (299) for torchvision."""
    if name in ZOO:
        return ZOO[name].input_size
    if _is_factory_path(name):
        return FACTORY_INPUT_SIZE
    if name in torchvision_models():
        return _TORCHVISION_SPECIAL_SIZES.get(name, TORCHVISION_INPUT_SIZE)
    raise _unknown(name)


def build_model(
    name: str,
    *,
    num_classes: int = DEFAULT_NUM_CLASSES,
    in_channels: int = DEFAULT_IN_CHANNELS,
    input_size: tuple[int, int] | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """A freshly initialised model (no pretrained weights) in training mode.

    input_size (height, width) matters only for models built for one size (torchvision ViT takes
    a square image_size, MaxViT an input_size); convolutional models accept any size and ignore it.
    model_kwargs go to the constructor unchanged.
    """
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive int, got {value!r}")
    if name in ZOO:
        return _call(ZOO[name].factory, name, num_classes=num_classes, in_channels=in_channels, **model_kwargs)
    if _is_factory_path(name):
        return _build_from_factory(name, num_classes, in_channels, model_kwargs)
    if name in torchvision_models():
        return _build_torchvision(name, num_classes, in_channels, {**_size_kwargs(name, input_size), **model_kwargs})
    raise _unknown(name)


def _size_kwargs(name: str, input_size: tuple[int, int] | None) -> dict[str, Any]:
    if input_size is None:
        return {}
    for prefix, keyword in _TORCHVISION_SIZE_KWARGS.items():
        if name.startswith(prefix):
            if keyword == "image_size":
                if input_size[0] != input_size[1]:
                    raise ConfigError(f"{name} takes square images only; give an input size HxH, not {input_size[0]}x{input_size[1]}")
                return {keyword: input_size[0]}
            return {keyword: tuple(input_size)}
    return {}


def _call(factory: Callable[..., Any], name: str, **kwargs: Any) -> nn.Module:
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise ConfigError(f"could not build {name!r} with arguments {sorted(kwargs)}: {error}; pass only arguments its constructor takes") from error
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{name!r} returned a {type(model).__name__}, not a torch.nn.Module; point it at a model factory")
    return model


def _build_torchvision(name: str, num_classes: int, in_channels: int, model_kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    if name in ("googlenet", "inception_v3"):  # their default init, said explicitly: unset, torchvision warns on every build
        model_kwargs = {"init_weights": True, **model_kwargs}
    model = _call(lambda **kw: torchvision.models.get_model(name, weights=None, **kw), name, num_classes=num_classes, **model_kwargs)
    if in_channels != DEFAULT_IN_CHANNELS:
        replace_first_conv(model, in_channels)
    return model


def replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first RGB conv (in module order, which is the stem in torchvision) for one taking in_channels.

    The new weight tiles the old one's input-channel slices, so it keeps the element
    distribution of the model's own initialisation instead of PyTorch's default conv init.
    """
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == DEFAULT_IN_CHANNELS and child.groups == 1:
                parent.add_module(child_name, _conv_with_inputs(child, in_channels))
                return
    raise ConfigError(f"found no 3-channel nn.Conv2d to adapt to in_channels={in_channels} in {type(model).__name__}; use in_channels=3")


def _conv_with_inputs(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    with_index = [i % conv.in_channels for i in range(in_channels)]
    new.weight.data.copy_(conv.weight.data[:, with_index])
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.data)
    return new


def _is_factory_path(name: str) -> bool:
    return ":" in name


def _build_from_factory(path: str, num_classes: int, in_channels: int, model_kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"cannot import {module_name!r} for model {path!r} ({error}); check the module path and that it is on PYTHONPATH") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, public, n=3)
        hint = f"; did you mean {', '.join(repr(f'{module_name}:{c}') for c in close)}?" if close else ""
        raise ConfigError(f"{module_name!r} has no callable {attr!r}{hint}")
    kwargs = dict(model_kwargs)
    named, has_var_kwargs = _parameters(factory)
    for key, value, default in (("num_classes", num_classes, DEFAULT_NUM_CLASSES), ("in_channels", in_channels, DEFAULT_IN_CHANNELS)):
        # a named parameter always gets the value; **kwargs only gets values the user changed,
        # since many factories forward **kwargs to a class that does not know in_channels
        if key in named or (has_var_kwargs and value != default):
            kwargs[key] = value
        elif value != default:
            raise ConfigError(f"{path} does not take {key}={value}; drop that option or add a `{key}` parameter to the factory")
    return _call(factory, path, **kwargs)


def _parameters(factory: Callable[..., Any]) -> tuple[set[str], bool]:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass nothing extra
        return set(), False
    return {p.name for p in parameters}, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    return ConfigError(
        f"unknown model {name!r}; {hint}choose a zoo model ({', '.join(ZOO)}), a torchvision "
        "classification model (fracfx.models.list_models()), or 'package.module:factory'"
    )
