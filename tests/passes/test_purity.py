"""The purity contract, over every declared pass (fracfx.passes.PASSES): a pass returns a new
GraphModule, leaves its input untouched (code, modules, meta, tensors) and changes no submodule's
own train/eval flag; run through run_pipeline, so each contract is checked on a real graph."""

import pytest
import torch
from torch import nn

import fracfx
import fracfx.passes as P
from fracfx.api import dfq_steps, quant_steps
from fracfx.config import CIFAR_CANDIDATES
from fracfx.export import calibrate
from fracfx.models import build_model
from fracfx.passes.infra import run_pipeline, step
from tests.passes.conftest import EXAMPLE, ConvNet as Net


BLOCK_EXAMPLE = (torch.randn(2, 3, 8, 8),)
DFQ = fracfx.DFQConfig(candidates=(*CIFAR_CANDIDATES, "skip", "fp32"))


def _before(steps, name):
    """The steps of a pipeline that run before the pass called `name`, and that pass's step."""
    index = next(i for i, s in enumerate(steps) if s.name == name)
    return steps[:index], steps[index]


def _frozen(*more):
    gm = fracfx.transform(Net(), fracfx.QuantConfig(keep_fp32=()), example_inputs=EXAMPLE)
    calibrate(gm, [torch.randn(4, 3, 6, 6) for _ in range(2)])
    return run_pipeline(gm, [step(P.freeze_precision), *more])


def prepared(name):
    """(the input of pass `name`, its step) on a small model."""
    if name in {s.name for s in quant_steps(fracfx.QuantConfig(), EXAMPLE, None)}:
        earlier, under_test = _before(quant_steps(fracfx.QuantConfig(), EXAMPLE, None), name)
        model = Net()
        return (run_pipeline(model, earlier) if earlier else model), under_test
    if name in ("annotate_blocks", "insert_gates"):
        earlier, under_test = _before(dfq_steps(DFQ, BLOCK_EXAMPLE, None), name)
        return run_pipeline(build_model("cifar_resnet20"), earlier), under_test
    if name == "pin_candidates":
        gm = fracfx.transform(build_model("cifar_resnet20"), DFQ, example_inputs=BLOCK_EXAMPLE)
        return gm, step(P.pin_candidates, choices={i: i % 7 for i in range(9)})
    if name == "freeze_precision":
        gm = fracfx.transform(Net(), fracfx.QuantConfig(keep_fp32=()), example_inputs=EXAMPLE)
        calibrate(gm, [torch.randn(4, 3, 6, 6) for _ in range(2)])
        return gm, step(P.freeze_precision)
    if name == "integer_arithmetic":
        return _frozen(), step(P.integer_arithmetic)
    if name == "insert_markers":
        return _frozen(step(P.integer_arithmetic)), step(P.insert_markers)
    raise AssertionError(f"no purity case for pass {name!r}: add one")


def _mix_modes(module: nn.Module) -> None:
    """Root in training mode, normalisation layers in eval: a mode a pass could overwrite."""
    module.train()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def _snapshot(gm):
    return {
        "code": getattr(gm, "code", None),
        "modules": {name: type(m) for name, m in gm.named_modules()},
        "modes": {name: m.training for name, m in gm.named_modules()},
        "state": {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)},
        "meta": [(n.name, dict(n.meta)) for n in gm.graph.nodes] if hasattr(gm, "graph") else None,
    }


@pytest.mark.parametrize("run", P.PASSES, ids=lambda p: p.contract.name)
def test_pass_leaves_its_input_and_every_submodules_mode_untouched(run):
    gm, under_test = prepared(run.contract.name)
    _mix_modes(gm)
    before = _snapshot(gm)
    out = run_pipeline(gm, [under_test])
    assert out is not gm and out.graph is not getattr(gm, "graph", None)
    after = _snapshot(gm)
    assert after["modes"] == before["modes"]  # each submodule's own flag, not only the root's
    assert after["code"] == before["code"]
    assert after["modules"] == before["modules"]
    assert after["meta"] == before["meta"]
    assert after["state"].keys() == before["state"].keys()
    for key in before["state"]:
        assert torch.equal(after["state"][key], before["state"][key]), key


def test_every_pass_has_a_purity_case_and_a_test_file():
    from pathlib import Path

    here = Path(__file__).parent
    for run in P.PASSES:
        prepared(run.contract.name)
        stem = run.contract.name.removesuffix("_graph")
        assert (here / f"test_{stem}.py").exists(), f"tests/passes/test_{stem}.py is missing"


def test_transform_keeps_the_callers_submodule_modes():
    model = build_model("cifar_resnet20")
    _mix_modes(model)
    modes = {name: m.training for name, m in model.named_modules()}
    fracfx.transform(model, DFQ, example_inputs=BLOCK_EXAMPLE)
    assert {name: m.training for name, m in model.named_modules()} == modes
