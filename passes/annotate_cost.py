"""annotate_cost: MACs per sample of every compute op, from shapes traced on example inputs.

The graph is run once in eval mode under no_grad (so no BatchNorm or range statistics move) on
the example inputs; the batch size is the leading dimension of the first tensor input, and each
op's MACs are divided by it. Results are stored as meta.OpCost on the compute nodes.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.fx as fx

from fracfx.errors import ConfigError
from fracfx.meta import OpCost, get_quant_spec, set_op_cost
from fracfx.passes.infra import copy_graph, rebuild


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if isinstance(value, torch.Tensor):
            self.shapes[n] = tuple(value.shape)
        return value


def _contraction(gm: fx.GraphModule, node: fx.Node, kind: str, shapes) -> int:
    """Multiplies per output element."""
    if node.op == "call_module":
        weight_shape = tuple(gm.get_submodule(node.target).weight.shape)
    elif kind in ("conv", "linear"):
        weight = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
        weight_shape = shapes[weight]
    else:  # matmul: the last dim of the left operand
        return shapes[node.args[0]][-1]
    return math.prod(weight_shape[1:])


def annotate_cost(gm: fx.GraphModule, /, *, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Return a copy of gm whose supported compute nodes carry OpCost (MACs per sample)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        raise ConfigError("example_inputs must contain at least one tensor with a batch dimension, e.g. torch.randn(1, 3, 32, 32)")
    batch = tensors[0].shape[0]
    graph, _ = copy_graph(gm)
    out = rebuild(gm, graph)
    recorder = _ShapeRecorder(out)
    was_training = out.training
    out.eval()
    try:
        with torch.no_grad():
            recorder.run(*example_inputs)
    except Exception as error:
        raise ConfigError(f"running the model on example_inputs failed ({type(error).__name__}: {error}); pass inputs the model accepts") from error
    finally:
        out.train(was_training)
    for node in graph.nodes:
        spec = get_quant_spec(node)
        if spec is None or spec.kind not in ("conv", "linear", "matmul") or node not in recorder.shapes:
            continue
        output_shape = recorder.shapes[node]
        total = math.prod(output_shape) * _contraction(out, node, spec.kind, recorder.shapes)
        set_op_cost(node, OpCost(macs_per_sample=total // batch, output_shape=output_shape))
    return out
