"""propagate_shapes: run the graph once on example inputs and record every tensor's shape.

The one forward run of the pipeline: annotate_blocks (gate sizes, batch-first checks) and
annotate_cost (MACs) read the meta.TensorShape it stores on each node that produced a tensor,
as torch.fx's ShapeProp does. The batch size is dim 0 of the first tensor input.

The run is in eval mode under no_grad, so no BatchNorm or range statistics move; every
submodule gets its own train/eval flag back afterwards (the modules are shared with the input).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from fracfx.errors import ConfigError
from fracfx.meta import SHAPE, TensorShape, set_shape
from fracfx.passes.infra import copy_graph, eval_mode, graph_pass, rebuild


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if isinstance(value, torch.Tensor):
            self.shapes[n] = tuple(value.shape)
        return value


def _batch_size_of(example_inputs: Sequence[torch.Tensor]) -> int:
    """Dim 0 of the first tensor input; ConfigError when there is none."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        raise ConfigError("example_inputs must contain at least one tensor with a batch dimension, e.g. torch.randn(1, 3, 32, 32)")
    return tensors[0].shape[0]


@graph_pass(writes=(SHAPE,))
def propagate_shapes(gm: fx.GraphModule, /, *, example_inputs: Sequence[torch.Tensor] | torch.Tensor) -> fx.GraphModule:
    """Return a copy of gm whose tensor-valued nodes carry TensorShape (see the module docstring)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    batch = _batch_size_of(example_inputs)
    recorder = _ShapeRecorder(gm)
    try:
        with eval_mode(gm), torch.no_grad():
            recorder.run(*example_inputs)
    except Exception as error:
        raise ConfigError(f"running the model on example_inputs failed ({type(error).__name__}: {error}); pass inputs the model accepts") from error
    graph, env = copy_graph(gm)
    for old, shape in recorder.shapes.items():
        if old in env:  # the output node is rebuilt by copy_graph, not mapped
            set_shape(env[old], TensorShape(shape, batch))
    return rebuild(gm, graph)
