"""capture_graph: a fresh GraphModule, a deep copy of the model, errors that say how to fix."""

import pytest
import torch
from torch import nn

from fracfx.errors import UnsupportedGraphError
from fracfx.meta import MODULE_STACK, TRACE_LEAVES
from fracfx.passes.capture import capture_graph
from tests.passes.conftest import EXAMPLE, ConvNet


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.inner(x)
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Branchy()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_copies_the_model_and_counts_one_node_per_call(convnet):
    gm = capture_graph(convnet)
    assert all(a is not b for a, b in zip(gm.parameters(), convnet.parameters()))
    assert [n.op for n in gm.graph.nodes].count("call_module") == 3  # conv, bn, fc
    assert gm.meta[TRACE_LEAVES] == ()
    assert any(n.meta.get(MODULE_STACK) for n in gm.graph.nodes)
    x = EXAMPLE[0]
    convnet.eval(), gm.eval()
    assert torch.equal(convnet(x), gm(x))


def test_accepts_a_graph_module_and_copies_it_too(convnet):
    gm = capture_graph(convnet)
    again = capture_graph(gm)
    assert again is not gm and again.code == gm.code
    assert all(a is not b for a, b in zip(again.parameters(), gm.parameters()))


def test_trace_failure_names_the_module_or_falls_back_to_a_leaf():
    with pytest.raises(UnsupportedGraphError, match="(?s)module 'body' .*Branchy.*leaf_modules"):
        capture_graph(Outer())
    gm = capture_graph(Outer(), fallback=True)
    assert gm.meta[TRACE_LEAVES] == ("body",)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["body", "head"]


def test_refuses_what_is_not_a_module():
    with pytest.raises(UnsupportedGraphError, match="nn.Module"):
        capture_graph(ConvNet)


def test_norm_with_a_training_branch_stays_a_leaf_so_eval_switches_it():
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward reads self.training, with an
    activation child; traced through, train mode would be baked into the graph."""

    class BatchNormAct(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.ReLU()

        def forward(self, x):
            mean = self.running_mean if not self.training else None
            var = self.running_var if not self.training else None
            return self.act(nn.functional.batch_norm(x, mean, var, self.weight, self.bias, self.training or mean is None, 0.1, self.eps))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4))
    gm = capture_graph(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    x = torch.randn(2, 3, 5, 5)
    model.eval(), gm.eval()
    assert torch.equal(gm(x), model(x))
