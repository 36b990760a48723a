"""propagate_shapes: one forward run that leaves every statistic and mode where it was."""

import pytest
import torch

from fracfx.errors import ConfigError
from fracfx.meta import TensorShape, get_shape
from fracfx.passes.capture import capture_graph
from fracfx.passes.propagate_shapes import propagate_shapes
from tests.passes.conftest import EXAMPLE


def test_records_every_tensor_shape_and_the_batch(convnet):
    gm = capture_graph(convnet)
    assert all(get_shape(n) is None for n in gm.graph.nodes)
    out = propagate_shapes(gm, example_inputs=EXAMPLE)
    shapes = {n.name: get_shape(n) for n in out.graph.nodes}
    assert shapes["x"] == TensorShape((2, 3, 6, 6), 2)
    assert shapes["conv"] == TensorShape((2, 4, 4, 4), 2)
    assert shapes["fc"] == TensorShape((2, 3), 2)
    assert shapes["output"] is None  # the output node holds no value of its own
    assert len(out.graph.nodes) == len(gm.graph.nodes)


def test_runs_in_eval_without_moving_statistics_or_modes(convnet):
    gm = capture_graph(convnet).train()
    gm.bn.eval()
    stats = gm.bn.running_mean.clone()
    propagate_shapes(gm, example_inputs=EXAMPLE[0])
    assert torch.equal(gm.bn.running_mean, stats)
    assert gm.training and not gm.bn.training and gm.conv.training


def test_bad_example_inputs_say_what_to_pass(convnet):
    gm = capture_graph(convnet)
    with pytest.raises(ConfigError, match="batch dimension"):
        propagate_shapes(gm, example_inputs=(torch.tensor(1.0),))
    with pytest.raises(ConfigError, match="pass inputs the model accepts"):
        propagate_shapes(gm, example_inputs=(torch.randn(2, 5, 6, 6),))
