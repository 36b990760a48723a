"""A conv/linear subclass whose own forward cannot be traced (timm's Conv2dSame) stays a
call_module leaf without trace_fallback and is still quantized: input, weight and gradient."""

import math

import torch
import torch.nn.functional as F
from torch import nn

import fracfx
from fracfx.meta import compute_nodes, get_binding, get_quant_spec


class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding, computed from the input size with Python arithmetic."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Conv2dSame(3, 4, 3, stride=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.stem(x)).mean((2, 3)))


def test_untraceable_conv_subclass_is_a_quantized_leaf():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 9, 9)
    gm = fracfx.transform(model, fracfx.QuantConfig(keep_fp32=()), example_inputs=x)
    assert gm.meta["fracfx_trace_leaves"] == () and fracfx.fp32_report(gm) == []
    stem = next(n for n in compute_nodes(gm.graph) if get_quant_spec(n).module_path == "stem")
    assert get_quant_spec(stem).kind == "conv" and get_quant_spec(stem).module_type == "Conv2dSame"
    binding = get_binding(stem)
    assert binding.weight and binding.act and binding.grad
    fracfx.set_bits(gm, 0, 0, 0)
    gm.eval()
    assert torch.equal(gm(x), model(x))
    fracfx.set_bits(gm, 8, 8, 8)
    gm.train()
    gm(x).sum().backward()
    assert torch.isfinite(gm.get_parameter("stem.weight").grad).all()
    assert gm.get_parameter("stem.weight").grad.abs().sum() > 0
    assert fracfx.cost_report(gm).macs > 0
