"""annotate_blocks: which regions DFQ gates, found from the traced graph alone."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fracfx.errors import PassError, UnsupportedGraphError
from fracfx.meta import get_block, get_block_ports
from fracfx.models.cifar_resnet import cifar_resnet20
from fracfx.passes.annotate_blocks import annotate_blocks
from fracfx.passes.annotate_quant import annotate_quant
from fracfx.passes.capture import capture_graph
from fracfx.passes.insert_quant import insert_quant
from fracfx.passes.propagate_shapes import propagate_shapes


def annotated(model, size=16, **options):
    gm = annotate_quant(capture_graph(model), keep_fp32=("@first", "@last"))
    return annotate_blocks(propagate_shapes(gm, example_inputs=(torch.randn(2, 3, size, size),)), **options)


def ports(gm, role):
    """{block index: (BlockSpec, node)} for one port role."""
    return {p.block.index: (p.block, n) for n in gm.graph.nodes for p in get_block_ports(n) if p.role == role}


def block_paths(gm):
    return [spec.module_path for spec, _ in sorted(ports(gm, "output").values(), key=lambda v: v[0].index)]


class OptionABlock(nn.Module):
    """CIFAR ResNet block with the parameter-free option-A shortcut (subsample + zero channels)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.extra = cout - cin

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra // 2)) if self.extra else x
        out = out + shortcut
        return F.relu(out)


class Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def tiny(*blocks):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 if len(blocks) < 2 else 16, 10))


def test_cifar_resnet_gates_every_block_including_downsampling_ones():
    gm = annotated(cifar_resnet20())
    assert block_paths(gm) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    outputs, shortcuts, inputs = ports(gm, "output"), ports(gm, "shortcut"), ports(gm, "input")
    for index, (spec, _) in outputs.items():
        assert spec.residual and spec.index == index
        _, shortcut = shortcuts[index]
        _, x = inputs[index]
        downsampling = spec.module_path in ("layer2.0", "layer3.0")
        # identity blocks add the input itself; projection blocks the downsample path's BN
        assert (shortcut is x) != downsampling
        if downsampling:
            assert shortcut.op == "call_module" and shortcut.target == f"{spec.module_path}.downsample.1"
    # the first block's input is the stem output; input shapes are per sample (C, H, W)
    assert inputs[0][0].input_shape == (16, 16, 16) and inputs[3][0].input_shape == (16, 16, 16)
    assert inputs[4][0].input_shape == (32, 8, 8)
    # every quantized conv inside a block carries its BlockSpec; the stem and fc carry none
    marked = [n for n in gm.graph.nodes if get_block(n) is not None]
    assert len(marked) == 9 * 2 + 2  # two convs per block + the two projection convs
    assert all(get_block(n).module_path in n.target for n in marked)


def test_option_a_shortcut_and_functional_blocks():
    gm = annotated(tiny(OptionABlock(8, 8, 1), OptionABlock(8, 16, 2)))
    assert block_paths(gm) == ["2", "3"]
    spec, shortcut = ports(gm, "shortcut")[1]
    assert shortcut.target is F.pad and spec.residual


@pytest.mark.parametrize("builder, expected", [
    (lambda: torchvision.models.resnet18(), [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]),
    (lambda: torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1]), [f"layer{s}.0" for s in (1, 2, 3, 4)]),
    (lambda: torchvision.models.mobilenet_v2(), [f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]),
], ids=["resnet18", "bottleneck", "mobilenet_v2"])
def test_torchvision_residual_blocks(builder, expected):
    gm = annotated(builder(), size=32)
    assert block_paths(gm) == expected  # stages (Sequential) and non-residual InvertedResiduals are not gated


def test_overrides_by_type_and_by_glob():
    by_type = annotated(torchvision.models.mobilenet_v2(), size=32, block_types=("InvertedResidual",))
    paths = block_paths(by_type)
    assert paths == [f"features.{i}" for i in range(1, 18)]
    residual = {spec.module_path: spec.residual for spec, _ in ports(by_type, "output").values()}
    assert not residual["features.4"] and residual["features.5"]
    by_glob = annotated(cifar_resnet20(), block_globs=("layer2.*",))
    assert block_paths(by_glob) == ["layer2.0", "layer2.1", "layer2.2"]


def test_the_innermost_of_nested_residual_regions_wins():
    inner = OptionABlock(8, 8, 1)
    gm = annotated(tiny(Residual(nn.Sequential(inner))))
    assert block_paths(gm) == ["2.body.0"]


def test_no_block_names_the_override_options():
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedGraphError, match="block_types=.*block_globs="):
        annotated(plain)
    with pytest.raises(UnsupportedGraphError, match="no module matched"):
        annotated(cifar_resnet20(), block_types=("NoSuchBlock",))


def test_pure_and_runs_before_insert_quant():
    gm = annotate_quant(capture_graph(cifar_resnet20()), keep_fp32=("@first", "@last"))
    gm = propagate_shapes(gm, example_inputs=(torch.randn(1, 3, 16, 16),))
    before = [dict(n.meta) for n in gm.graph.nodes]
    out = annotate_blocks(gm)
    assert out is not gm and [dict(n.meta) for n in gm.graph.nodes] == before
    with pytest.raises(PassError, match="before insert_quant"):
        annotate_blocks(insert_quant(gm))


def test_cifar_mobilenet_v2_gates_its_residual_blocks_with_projection_shortcuts():
    from fracfx.models import build_model
    from fracfx.models.cifar_mobilenet_v2 import InvertedResidual

    model = build_model("cifar_mobilenet_v2")
    expected = [path for path, m in model.named_modules() if isinstance(m, InvertedResidual) and m.residual]
    assert block_paths(annotated(model)) == expected and len(expected) == 14
