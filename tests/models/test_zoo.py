"""The model zoo and build_model(): sizes, shapes, residual adds in the graph, name resolution."""

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from fracfx.errors import ConfigError
from fracfx.models import build_model, default_input_size, list_models
from fracfx.models.cifar_mobilenet_v2 import InvertedResidual
from fracfx.models.cifar_resnet import BasicBlock, CifarResNet

ZOO = ("cifar_resnet8", "cifar_resnet14", "cifar_resnet20", "cifar_resnet38", "cifar_resnet74", "cifar_mobilenet_v2")  # image models
ALL_ZOO = ZOO + ("transformer_lm",)


def tiny_net(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A factory for the `package.module:factory` form."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def fixed_net() -> nn.Module:
    """A factory that takes no num_classes / in_channels."""
    return nn.Linear(3, 2)


def not_a_model():
    return {"weights": None}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, expected",
    # docs/method.md section 6 (0.565M, 1.150M, about 2.30M); ResNet-20 with projection shortcuts
    [("cifar_resnet8", 78_000), ("cifar_resnet14", 175_000), ("cifar_resnet38", 565_000), ("cifar_resnet74", 1_150_000), ("cifar_mobilenet_v2", 2_300_000), ("cifar_resnet20", 272_000)],
)
def test_parameter_counts_match_the_paper_within_2_percent(name, expected):
    assert abs(_params(build_model(name)) - expected) / expected < 0.02


def test_resnet_depth_sets_blocks_per_stage():
    for depth, blocks in ((20, 3), (38, 6), (74, 12)):
        model = CifarResNet(depth)
        assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [blocks] * 3
        # stride 2 and a 1x1 projection at the start of stages 2 and 3 only
        firsts = [model.layer1[0], model.layer2[0], model.layer3[0]]
        assert [b.conv1.stride for b in firsts] == [(1, 1), (2, 2), (2, 2)]
        assert [b.downsample is not None for b in firsts] == [False, True, True]
        assert firsts[1].downsample[0].kernel_size == (1, 1)
    with pytest.raises(ConfigError, match="6n\\+2"):
        CifarResNet(21)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("in_channels, size", [(1, 28), (3, 32)])
def test_forward_shapes(name, in_channels, size):
    model = build_model(name, num_classes=7, in_channels=in_channels)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)


def _residual_blocks(model: nn.Module):
    return [(path, m) for path, m in model.named_modules() if isinstance(m, BasicBlock) or (isinstance(m, InvertedResidual) and m.residual)]


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_mobilenet_v2"])
def test_each_block_traces_to_an_add_of_its_own_input(name):
    """DFQ finds blocks as submodules whose traced body ends in an add with the block's input."""
    model = build_model(name)
    blocks = _residual_blocks(model)
    assert len(blocks) == (9 if name == "cifar_resnet20" else 14)  # MobileNetV2: every stride-1 block
    for path, block in blocks:
        graph = fx.symbolic_trace(block).graph
        (x,) = [n for n in graph.nodes if n.op == "placeholder"]
        adds = [n for n in graph.nodes if n.target is operator.add]
        assert len(adds) == 1, path
        add = adds[0]
        shortcut = add.args[1]
        projected = getattr(block, "downsample", None) or getattr(block, "shortcut", None)
        if projected is None:
            assert shortcut is x, path
        else:  # the projection (1x1 conv + BN) applied to the block's input
            assert x in shortcut.args[0].args, path
        (result,) = [n for n in graph.nodes if n.op == "output"][0].args
        # the add is the last step, or followed only by the block's ReLU (ResNet)
        assert result is add or (result.op == "call_module" and result.args == (add,)), path


def test_residual_adds_stay_inside_their_block_in_the_whole_model_trace():
    model = build_model("cifar_resnet20")
    graph = fx.symbolic_trace(model).graph
    owners = [list(n.meta["nn_module_stack"])[-1] for n in graph.nodes if n.target is operator.add]
    assert sorted(owners) == sorted(path for path, _ in _residual_blocks(model))


def test_torchvision_models_adapt_classes_and_input_channels():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=7, in_channels=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    vit = build_model("vit_b_16", num_classes=5, in_channels=2, input_size=(32, 32))
    assert vit.conv_proj.in_channels == 2
    assert vit(torch.randn(1, 2, 32, 32)).shape == (1, 5)


def test_replaced_first_conv_keeps_the_original_initialisation():
    torch.manual_seed(0)
    rgb = build_model("resnet18")
    torch.manual_seed(0)
    gray = build_model("resnet18", in_channels=4)
    # channel i of the new stem reuses the original slice i mod 3
    assert torch.equal(gray.conv1.weight[:, 3], rgb.conv1.weight[:, 0])
    assert torch.equal(gray.conv1.weight[:, :3], rgb.conv1.weight)


def test_factory_path_builds_and_passes_only_what_the_factory_takes():
    model = build_model("tests.models.test_zoo:tiny_net", num_classes=4, in_channels=1)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    assert isinstance(build_model("tests.models.test_zoo:fixed_net"), nn.Linear)
    with pytest.raises(ConfigError, match="does not take num_classes=4"):
        build_model("tests.models.test_zoo:fixed_net", num_classes=4)
    with pytest.raises(ConfigError, match="did you mean 'tests.models.test_zoo:tiny_net'"):
        build_model("tests.models.test_zoo:tiny_nt")
    with pytest.raises(ConfigError, match="cannot import 'no_such_package.nets'"):
        build_model("no_such_package.nets:net")
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        build_model("tests.models.test_zoo:not_a_model")


@pytest.mark.parametrize("typo, suggestion", [("cifar_resnet39", "cifar_resnet38"), ("resnet_18", "resnet18"), ("mobilenetv2", "mobilenet_v2")])
def test_unknown_name_suggests_close_matches(typo, suggestion):
    with pytest.raises(ConfigError, match=f"unknown model '{typo}'; did you mean .*'{suggestion}'") as info:
        build_model(typo)
    assert "package.module:factory" in str(info.value)
    with pytest.raises(ConfigError, match="did you mean"):
        default_input_size(typo)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="num_classes must be a positive int"):
        build_model("cifar_resnet20", num_classes=0)
    with pytest.raises(ConfigError, match="square"):
        build_model("vit_b_16", input_size=(32, 64))
    with pytest.raises(ConfigError, match="could not build 'resnet18'"):
        build_model("resnet18", no_such_option=1)


def test_list_models_and_default_input_sizes():
    names = list_models()
    assert names[: len(ALL_ZOO)] == list(ALL_ZOO)
    assert {"resnet18", "vit_b_16", "swin_t"} <= set(names)
    assert list_models(include_torchvision=False) == list(ALL_ZOO)
    assert default_input_size("cifar_resnet38") == (32, 32)
    assert default_input_size("resnet18") == (224, 224)
    assert default_input_size("inception_v3") == (299, 299)
