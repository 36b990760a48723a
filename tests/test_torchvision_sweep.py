"""Every torchvision classification model through fracfx.transform (weights=None).

For each model: the transform succeeds; with quantization disabled the eval output is bit-exact
to the original model; at 8/8/8 in train mode a forward + backward gives finite gradients for
every parameter; every conv/linear is either quantized or listed by fracfx.fp32_report.

The full sweep is @slow (7 minutes wall, 3.4 CPU-minutes on one thread; peak RSS 7.4 GB, from
regnet_y_128gf and vit_h_14, about 640M parameters each);
a fast subset runs by default. Inputs are the smallest each model accepts, batch 2.
Set FRACFX_TEST_THREADS to choose torch's thread count.
"""

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fracfx
from fracfx.meta import compute_nodes, get_quant_spec
from fracfx.models import build_model
from fracfx.nn.quantizers import GradQuant
from tests.sweep_checks import _is_covered, _threads, _weight_modules  # noqa: F401 (_threads: autouse fixture)

ALL_MODELS = torchvision.models.list_models(module=torchvision.models)
FAST_MODELS = ("resnet18", "mobilenet_v2", "vit_b_16", "googlenet", "squeezenet1_0", "swin_t")
SMALLEST_INPUT = {
    "alexnet": 64,  # 11x11 stride-4 stem and three 3x3 stride-2 pools need at least 63
    "inception_v3": 75,  # its documented minimum (without the auxiliary head)
    "maxvit_t": 224,  # 7x7 partitions at every stage: the input must be a multiple of 224
}
DEFAULT_INPUT = 32  # every other CNN (and Swin, which pads to its windows) takes 32x32
# The auxiliary heads are off: torch.fx bakes `if self.training` into the graph, so a model
# traced in train mode would return (logits, aux) tuples even in eval (see test below).
CONSTRUCTOR_KWARGS = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


def sweep_case(name: str) -> tuple[int, dict]:
    """(input side, constructor kwargs) for one model."""
    vit = re.fullmatch(r"vit_[a-z]_(\d+)", name)
    if vit:  # ViT is built for one image size; 2x2 patches is the smallest sensible one
        return 2 * int(vit.group(1)), {}
    return SMALLEST_INPUT.get(name, DEFAULT_INPUT), CONSTRUCTOR_KWARGS.get(name, {})


def check_model(name: str) -> None:
    torch.manual_seed(0)
    size, kwargs = sweep_case(name)
    model = build_model(name, input_size=(size, size), **kwargs)
    x = torch.randn(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()  # transform a training-mode model, as a user about to train would
    weight_modules = _weight_modules(model)
    gm = fracfx.transform(model, fracfx.QuantConfig(), example_inputs=x)
    del model  # the largest models (640M parameters) must not be held twice during backward

    fracfx.set_bits(gm, 0, 0, 0)
    gm.eval()
    with torch.no_grad():
        got = gm(x)
    assert torch.equal(got, expected), f"{name}: disabled quantization differs by {(got - expected).abs().max().item():.3g}"

    fracfx.set_bits(gm, 8, 8, 8)
    gm.train()
    assert sum(isinstance(m, GradQuant) for m in gm.modules()) > 0
    F.cross_entropy(gm(x), torch.tensor([1, 2])).backward()
    for param_name, param in gm.named_parameters():
        assert param.grad is not None, f"{name}: {param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {param_name} has a non-finite gradient"

    quantized = {get_quant_spec(n).module_path for n in compute_nodes(gm.graph) if get_quant_spec(n).quantize}
    fp32 = {op.module_path for op in fracfx.fp32_report(gm)}
    assert quantized, f"{name}: nothing was quantized"
    # replaced attention quantizes its projections under the attention module's own path
    # (e.g. self_attention covers self_attention.out_proj); the root path covers nothing
    missing = [p for p in weight_modules if not _is_covered(p, quantized - {""}) and not _is_covered(p, fp32)]
    assert not missing, f"{name}: neither quantized nor in fp32_report: {missing[:5]}"


@pytest.mark.parametrize("name", FAST_MODELS)
def test_fast_subset(name):
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_torchvision_model(name):
    check_model(name)


def test_opaque_attention_is_reported_fp32():
    torch.manual_seed(0)
    config = fracfx.QuantConfig(replace_attention=False)  # the default opens MHA up and quantizes it
    vit = fracfx.transform(build_model("vit_b_16", input_size=(32, 32)), config, example_inputs=torch.randn(1, 3, 32, 32))
    mha = [op for op in fracfx.fp32_report(vit) if op.op == "MultiheadAttention"]
    assert len(mha) == 12 and all("not a supported op" in op.reason for op in mha)
    model = build_model("swin_t")
    swin = fracfx.transform(model, example_inputs=torch.randn(1, 3, 32, 32))
    attention = {op.module_path for op in fracfx.fp32_report(swin) if op.op == "shifted_window_attention"}
    expected = {path for path, m in model.named_modules() if isinstance(m, torchvision.models.swin_transformer.ShiftedWindowAttention)}
    assert len(expected) == 12 and attention == expected


# Regressions the sweep found (squeezenet/alexnet/efficientnet; swin/convnext/efficientnet/maxvit)


def test_inplace_op_right_after_a_quantized_conv_trains():
    """conv -> ReLU(inplace=True): the gradient quantizer's output must not be a view."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    gm = fracfx.transform(model, fracfx.QuantConfig(keep_fp32=()))
    gm(torch.randn(2, 3, 8, 8)).sum().backward()
    assert torch.isfinite(gm.get_parameter("0.weight").grad).all()


def test_stochastic_depth_switches_off_in_eval():
    """torchvision's StochasticDepth reads self.training; tracing through it would freeze train mode."""
    torch.manual_seed(0)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.drop = torchvision.ops.StochasticDepth(0.5, "row")

        def forward(self, x):
            return x + self.drop(self.conv(x))

    model = Residual()
    gm = fracfx.transform(model, fracfx.QuantConfig(act_bits=0, weight_bits=0, grad_bits=0))
    x = torch.randn(16, 4, 5, 5)
    model.eval(), gm.eval()
    assert torch.equal(gm(x), model(x))
    gm.train()
    dropped = (gm(x) == x).flatten(1).all(1)
    assert 0 < dropped.sum() < 16, "in train mode some rows are dropped, some kept"


def test_train_mode_branches_are_frozen_by_tracing():
    """Documents an fx limit fracfx inherits: `if self.training` in a forward is decided at trace time."""
    torch.manual_seed(0)
    model = build_model("googlenet", input_size=(32, 32))  # aux_logits=True
    gm = fracfx.transform(model)
    gm.eval()
    out = gm(torch.randn(2, 3, 32, 32))
    assert isinstance(out, tuple) and len(out) == 3, "the train-mode graph (with aux heads) is what was captured"
