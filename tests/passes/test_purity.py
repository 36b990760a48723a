"""The purity contract: every pass returns a new GraphModule and leaves its input untouched."""

import copy

import pytest
import torch
from torch import nn

import fracfx.passes as P
from fracfx.config import CIFAR_CANDIDATES
from fracfx.models import build_model


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
BLOCK_EXAMPLE = (torch.randn(2, 3, 8, 8),)


def _blocks(gm):
    return P.annotate_blocks(P.annotate_quant(gm), example_inputs=BLOCK_EXAMPLE)


def _quantized_blocks(gm):
    return P.insert_quant(P.annotate_cost(_blocks(gm), example_inputs=BLOCK_EXAMPLE))


def _same(gm):
    return gm


# name -> (model, prepare: the passes before it, the pass under test on the prepared graph)
PASSES = {
    "replace_attention": ("net", _same, P.replace_attention),
    "annotate_quant": ("net", _same, lambda gm: P.annotate_quant(gm, keep_fp32=("@last",))),
    "annotate_cost": ("net", P.annotate_quant, lambda gm: P.annotate_cost(gm, example_inputs=EXAMPLE)),
    "insert_quant": ("net", P.annotate_quant, P.insert_quant),
    "annotate_blocks": ("resnet", P.annotate_quant, lambda gm: P.annotate_blocks(gm, example_inputs=BLOCK_EXAMPLE)),
    "insert_gates": ("resnet", _quantized_blocks, lambda gm: P.insert_gates(gm, candidates=CIFAR_CANDIDATES)),
    "pin_candidates": ("resnet", lambda gm: P.insert_gates(_quantized_blocks(gm), candidates=(*CIFAR_CANDIDATES, "skip", "fp32")),
                       lambda gm: P.pin_candidates(gm, choices={i: i % 7 for i in range(9)})),
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
    model, prepare, run = PASSES[name]
    gm = prepare(P.capture_graph(build_model("cifar_resnet20") if model == "resnet" else Net()))
    before = _snapshot(gm)
    out = run(gm)
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
