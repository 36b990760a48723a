"""The runner and the pass contract: every failure names the pass and the passes before it."""

import pytest
import torch
import torch.fx as fx
from torch import nn

import fracfx
from fracfx.errors import ConfigError, FracfxError, PassError, UnsupportedGraphError
from fracfx.meta import OP_COST, QUANT_SPEC, OpCost, set_op_cost
from fracfx.passes.annotate_quant import annotate_quant
from fracfx.passes.capture import capture_graph
from fracfx.passes.infra import attr, copy_graph, eval_mode, graph_pass, rebuild, remove_dead_nodes, run_pipeline, step
from fracfx.passes.propagate_shapes import propagate_shapes
from tests.passes.conftest import EXAMPLE, ConvNet


@graph_pass()
def breaks(gm, /, *, error):
    raise error


@graph_pass(reads=(QUANT_SPEC,))
def writes_undeclared(gm, /):
    graph, _ = copy_graph(gm)
    for node in graph.nodes:
        set_op_cost(node, OpCost(1, ()))
    return rebuild(gm, graph)


@graph_pass(writes=(OP_COST,))
def writes_declared(gm, /):
    return writes_undeclared(gm)


@graph_pass()
def copies(gm, /):
    graph, _ = copy_graph(gm)
    return rebuild(gm, graph)


def pipeline(error):
    return [step(capture_graph), step(annotate_quant), step(breaks, error=error)]


@pytest.mark.parametrize("error, cls", [
    (ConfigError("bad value"), ConfigError),
    (UnsupportedGraphError("odd graph"), UnsupportedGraphError),
    (FracfxError("plain"), FracfxError),
    (KeyError("bug"), PassError),
])
def test_every_failure_names_the_pass_and_its_predecessors(error, cls):
    with pytest.raises(cls) as caught:
        run_pipeline(ConvNet(), pipeline(error))
    message = str(caught.value)
    assert message.startswith("pass 'breaks' failed (after capture_graph, annotate_quant): ")
    assert caught.value.pass_name == "breaks" and caught.value.after == ("capture_graph", "annotate_quant")
    assert caught.value.__cause__ is error
    assert isinstance(caught.value, FracfxError)


def test_the_first_pass_failing_says_so():
    with pytest.raises(ConfigError, match=r"pass 'breaks' failed \(after nothing \(the first pass\)\): x"):
        run_pipeline(capture_graph(ConvNet()), [step(breaks, error=ConfigError("x"))])


def test_transform_errors_name_the_pass():
    with pytest.raises(ConfigError, match=r"pass 'propagate_shapes' failed \(after capture_graph, lower_aten, replace_attention, annotate_quant\)"):
        fracfx.transform(ConvNet(), example_inputs=torch.randn(2, 5, 6, 6))


def test_reads_are_checked_before_and_writes_after():
    gm = capture_graph(ConvNet())
    with pytest.raises(PassError, match=r"writes_undeclared' failed .*reads meta \['fracfx_quant'\]"):
        run_pipeline(gm, [step(writes_undeclared)])
    with pytest.raises(PassError, match=r"wrote meta \['fracfx_cost'\] that it does not declare"):
        run_pipeline(gm, [step(annotate_quant), step(writes_undeclared)])
    out = run_pipeline(gm, [step(annotate_quant), step(writes_declared), step(copies)])
    assert out.graph is not gm.graph  # carrying meta written earlier is not a write


def test_skipped_steps_do_not_run_and_undeclared_functions_are_refused():
    gm = capture_graph(ConvNet())
    assert run_pipeline(gm, [step(breaks, error=ConfigError("x"), when=False)]) is gm
    with pytest.raises(TypeError, match="graph_pass"):
        step(lambda gm: gm)
    with pytest.raises(ValueError, match="not a meta key"):
        graph_pass(reads=("no_such_key",))


def test_helpers_attr_dead_nodes_and_eval_mode():
    gm = capture_graph(ConvNet())
    assert attr(gm, "conv.weight") is gm.conv.weight and attr(gm, "bn") is gm.bn
    graph, _ = copy_graph(gm)
    with graph.inserting_before(next(iter(graph.nodes)).next):
        graph.call_function(torch.relu, (next(iter(graph.nodes)),))
    count = len(graph.nodes)
    remove_dead_nodes(graph)
    assert len(graph.nodes) == count - 1
    gm.train()
    gm.bn.eval()
    with eval_mode(gm):
        assert not any(m.training for m in gm.modules())
    assert gm.training and gm.conv.training and not gm.bn.training


def test_rebuild_shares_unchanged_modules_and_keeps_their_modes():
    gm = capture_graph(ConvNet()).train()
    gm.bn.eval()
    graph, _ = copy_graph(gm)
    out = rebuild(gm, graph, {"fc": nn.Linear(4, 3)})
    assert out.conv is gm.conv and out.fc is not gm.fc
    assert not gm.bn.training and out.fc.training and out.training
