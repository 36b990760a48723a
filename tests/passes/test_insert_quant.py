"""insert_quant: quantizer nodes around every selected op; exact when the bits say FP32."""

import torch
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
