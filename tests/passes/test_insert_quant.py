"""insert_quant: quantizer nodes around every selected op; exact when the bits say FP32."""

import torch

import fracfx
from torch import nn

from fracfx.meta import ACT_QUANT, GRAD_QUANT, WEIGHT_QUANT, compute_nodes, get_binding, get_inserted
from fracfx.nn.precision import set_bits
from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant
from fracfx.passes.annotate_quant import annotate_quant
from fracfx.passes.capture import capture_graph
from fracfx.passes.insert_quant import insert_quant
from tests.passes.conftest import EXAMPLE


def roles(gm):
    return [get_inserted(n).role for n in gm.graph.nodes if get_inserted(n) is not None]


def test_op_counts_after(convnet):
    gm = annotate_quant(capture_graph(convnet), keep_fp32=("fc",))
    assert roles(gm) == []
    out = insert_quant(gm, act_bits=4, weight_bits=3, grad_bits=6)
    # conv: act + weight + grad; fc kept FP32: nothing; matmul: two acts + grad
    assert sorted(roles(out)) == sorted([ACT_QUANT, WEIGHT_QUANT, GRAD_QUANT, ACT_QUANT, ACT_QUANT, GRAD_QUANT])
    counts = {kind: sum(type(m) is kind for m in out.modules()) for kind in (ActQuant, WeightQuant, GradQuant)}
    assert counts == {ActQuant: 3, WeightQuant: 1, GradQuant: 2}
    assert {m.current_bits for m in out.modules() if type(m) is WeightQuant} == {3}
    bound = [get_binding(n) for n in compute_nodes(out.graph) if get_binding(n) is not None]
    assert len(bound) == 2 and bound[0].weight is not None and bound[1].weight is None and len(bound[1].act) == 2
    assert set(gm.state_dict()) <= set(out.state_dict()), "parameter names are kept"


def test_zero_bits_is_bit_exact_forward_and_backward(convnet):
    gm = capture_graph(convnet)
    out = insert_quant(annotate_quant(gm, keep_fp32=()))
    set_bits(out, 0, 0, 0)
    x = torch.randn(*EXAMPLE[0].shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    gm(x).square().sum().backward()
    out(x2).square().sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(gm.conv.weight.grad, out.get_parameter("conv.weight").grad) or gm.conv.weight is out.get_parameter("conv.weight")


def test_nothing_selected_nothing_inserted():
    gm = annotate_quant(capture_graph(nn.Sequential(nn.Linear(2, 2))), keep_fp32=("*",))
    out = insert_quant(gm)
    assert roles(out) == [] and len(out.graph.nodes) == len(gm.graph.nodes)


def test_in_place_write_behind_an_identity_or_a_view_copies_the_gradient_quantizer_output():
    """timm's SE module: conv -> nn.Identity (no norm) -> ReLU(inplace=True); also x.view(...).relu_()
    each writes to the quantizer's output through an alias, so GradQuant copies."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 4, 1), nn.Identity(), nn.ReLU(inplace=True)
            self.fc, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            y = self.act(self.bn(self.conv(x))).mean((2, 3))
            z = self.fc(y)
            z.view(-1).relu_()
            w = self.fc2(y)
            w += z
            return w

    torch.manual_seed(0)
    gm = fracfx.transform(Net(), fracfx.QuantConfig(keep_fp32=()))
    copies = {name: m.copy_output for name, m in gm.named_modules() if isinstance(m, GradQuant)}
    assert copies["fracfx_quant.conv.grad"] and copies["fracfx_quant.fc.grad"], copies
    assert not copies["fracfx_quant.fc2.grad"]  # fx records `w += z` on a proxy as w = w + z: no write
    gm(torch.randn(2, 3, 4, 4)).sum().backward()
    assert torch.isfinite(gm.get_parameter("conv.weight").grad).all()
