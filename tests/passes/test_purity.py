"""The purity contract: every pass returns a new GraphModule and leaves its input untouched."""

import copy

import pytest
import torch
from torch import nn

import fracfx.passes as P


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.bn(self.conv(x)).relu().mean((2, 3))
        return self.fc(y) @ torch.ones(3, 3)


EXAMPLE = (torch.randn(2, 3, 6, 6),)
PASSES = {
    "annotate_quant": lambda gm: P.annotate_quant(gm, keep_fp32=("@last",)),
    "annotate_cost": lambda gm: P.annotate_cost(P.annotate_quant(gm), example_inputs=EXAMPLE),
    "insert_quant": lambda gm: P.insert_quant(P.annotate_quant(gm)),
}


def _snapshot(gm):
    return {
        "code": gm.code,
        "modules": {name: type(m) for name, m in gm.named_modules()},
        "state": {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)},
        "meta": [(n.name, sorted(n.meta)) for n in gm.graph.nodes],
        "training": gm.training,
    }


@pytest.mark.parametrize("name", sorted(PASSES))
def test_pass_leaves_input_untouched(name):
    gm = P.capture_graph(Net())
    before = _snapshot(gm)
    out = PASSES[name](gm)
    assert out is not gm and out.graph is not gm.graph
    after = _snapshot(gm)
    assert after["code"] == before["code"]
    assert after["modules"] == before["modules"]
    assert after["meta"] == before["meta"]
    assert after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    for key in before["state"]:
        assert torch.equal(after["state"][key], before["state"][key]), key


def test_capture_copies_the_model_and_accepts_a_graph_module():
    model = Net()
    gm = P.capture_graph(model)
    assert all(a is not b for a, b in zip(gm.parameters(), model.parameters()))
    again = P.capture_graph(gm)
    assert again is not gm and again.code == gm.code
    x = EXAMPLE[0]
    model.eval(), gm.eval(), again.eval()
    assert torch.equal(model(x), gm(x)) and torch.equal(gm(x), again(x))
