"""annotate_cost: MACs per sample from the recorded shapes, against hand counts."""

import pytest
import torch
from torch import nn

from fracfx.meta import get_op_cost
from fracfx.passes.annotate_cost import annotate_cost
from fracfx.passes.annotate_quant import annotate_quant
from fracfx.passes.capture import capture_graph
from fracfx.passes.infra import run_pipeline, step
from fracfx.passes.propagate_shapes import propagate_shapes
from fracfx.errors import PassError
from tests.passes.conftest import EXAMPLE


def test_macs_per_sample_match_hand_counts(convnet):
    gm = propagate_shapes(annotate_quant(capture_graph(convnet)), example_inputs=EXAMPLE)
    assert all(get_op_cost(n) is None for n in gm.graph.nodes)
    out = annotate_cost(gm)
    macs = {n.name: get_op_cost(n).macs_per_sample for n in out.graph.nodes if get_op_cost(n)}
    # conv 3->4, 3x3 kernel, 4x4 output: 4*4*4 outputs * 27; fc 4->3: 12; matmul (3,1)@(1,3): 9 outputs * 1
    assert macs == {"conv": 64 * 27, "fc": 12, "matmul": 9}
    assert get_op_cost(next(n for n in out.graph.nodes if n.name == "conv")).output_shape == (2, 4, 4, 4)


def test_functional_ops_read_the_weight_shape_from_the_graph():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w)

    gm = propagate_shapes(annotate_quant(capture_graph(Functional())), example_inputs=(torch.randn(3, 7, 4),))
    out = annotate_cost(gm)
    assert [get_op_cost(n).macs_per_sample for n in out.graph.nodes if get_op_cost(n)] == [7 * 5 * 4]


def test_the_runner_refuses_it_without_shapes(convnet):
    gm = annotate_quant(capture_graph(convnet))
    with pytest.raises(PassError, match=r"annotate_cost.*reads meta \['fracfx_shape'\]"):
        run_pipeline(gm, [step(annotate_cost)])
