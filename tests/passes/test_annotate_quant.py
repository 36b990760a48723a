"""annotate_quant: one QuantSpec per compute op, with the reason when it stays FP32."""

import torch
from torch import nn

from fracfx.meta import CONV, LINEAR, MATMUL, UNSUPPORTED, compute_nodes, get_quant_spec
from fracfx.passes.annotate_quant import annotate_quant
from fracfx.passes.capture import capture_graph


def specs(gm):
    return [(get_quant_spec(n).kind, get_quant_spec(n).quantize) for n in compute_nodes(gm.graph)]


def test_precondition_no_specs_then_every_compute_op_annotated(convnet):
    gm = capture_graph(convnet)
    assert compute_nodes(gm.graph) == []
    out = annotate_quant(gm)
    assert specs(out) == [(CONV, True), (LINEAR, True), (MATMUL, True)]
    assert len(out.graph.nodes) == len(gm.graph.nodes)  # policy only: no node added or removed


def test_keep_fp32_shortcuts_globs_and_kinds_say_why(convnet):
    gm = capture_graph(convnet)
    out = annotate_quant(gm, keep_fp32=("@first", "f*"), quantize=("conv", "linear"))
    reasons = [get_quant_spec(n).reason for n in compute_nodes(out.graph)]
    assert reasons == ["@first kept FP32", "keep_fp32 glob 'f*'", "op kind 'matmul' not in quantize=('conv', 'linear')"]
    assert specs(out) == [(CONV, False), (LINEAR, False), (MATMUL, False)]


def test_other_parameterised_modules_are_reported_unsupported():
    model = nn.Sequential(nn.Linear(4, 4), nn.ConvTranspose2d(4, 4, 1), nn.Embedding(3, 4))
    gm = capture_graph(nn.Sequential(model[0], model[1]))
    out = annotate_quant(gm)
    spec = get_quant_spec(list(compute_nodes(out.graph))[-1])
    assert spec.kind == UNSUPPORTED and not spec.quantize and "not a supported op" in spec.reason
    assert annotate_quant(capture_graph(nn.Sequential(model[2]))).graph is not None
    assert compute_nodes(annotate_quant(capture_graph(nn.Sequential(model[2]))).graph) == []  # lookups are not compute


def test_numerics_unchanged(convnet):
    gm = capture_graph(convnet).eval()
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(annotate_quant(gm).eval()(x), gm(x))
