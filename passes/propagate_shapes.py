"""propagate_shapes: run the graph once on example inputs and record every tensor's shape.

The one forward run of the pipeline: annotate_blocks (gate sizes, batch-first checks) and
annotate_cost (MACs) read the meta.TensorShape it stores on each node that produced a tensor,
as torch.fx's ShapeProp does. The batch size is dim 0 of the first tensor input.

The run is in eval mode under no_grad, so no BatchNorm or range statistics move; every
submodule gets its own train/eval flag back afterwards (the modules are shared with the input).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fracfx.errors import ConfigError
from fracfx.meta import CAPTURED, SHAPE, TensorShape, set_shape
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


def _flat_inputs(gm: fx.GraphModule, example_inputs) -> list[Any]:
    """The values of gm's placeholders, in order, for positional (tuple) or keyword (dict) inputs."""
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (tuple(example_inputs), {})
    codegen = gm.graph._codegen
    if isinstance(codegen, fx.graph._PyTreeCodeGen) and codegen.pytree_info.in_spec is not None:
        spec = codegen.pytree_info.in_spec  # a torch.export graph: ((args), {kwargs}) flattened
        if spec.num_children == 2 and spec.child(1).context is not None:
            kwargs = {k: kwargs[k] for k in spec.child(1).context if k in kwargs}
        return pytree.tree_leaves((args, kwargs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(args)
    for node in placeholders[len(args):]:
        if node.target in kwargs:
            values.append(kwargs[node.target])
        elif node.args:  # the parameter's default
            values.append(node.args[0])
        else:
            raise ConfigError(f"example_inputs has no value for the model's input {node.target!r}")
    return values


def _batch_size_of(example_inputs: Sequence[torch.Tensor]) -> int:
    """Dim 0 of the first tensor input; ConfigError when there is none."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        raise ConfigError("example_inputs must contain at least one tensor with a batch dimension, e.g. torch.randn(1, 3, 32, 32)")
    return tensors[0].shape[0]


@contextlib.contextmanager
def _one_thread():
    """The shape run on one intra-op thread: on the example inputs' small tensors a thread pool's
    fork/join per op costs more than the op (full-size GPT-2: 2.4 s with 2 threads, 0.8 s with 1, on
    a loaded 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@graph_pass(writes=(SHAPE,))
def propagate_shapes(gm: fx.GraphModule, /, *, example_inputs: Sequence[torch.Tensor] | torch.Tensor | Mapping[str, Any]) -> fx.GraphModule:
    """Return a copy of gm whose tensor-valued nodes carry TensorShape (see the module docstring).

    example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    recorder = _ShapeRecorder(gm)
    try:
        flatten = isinstance(example_inputs, Mapping) or gm.meta.get(CAPTURED) == "export"
        flat = _flat_inputs(gm, example_inputs) if flatten else list(example_inputs)
        batch = _batch_size_of(flat)
        with eval_mode(gm), torch.no_grad(), _one_thread():
            recorder.run(*flat, enable_io_processing=not flatten)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"running the model on example_inputs failed ({type(error).__name__}: {error}); pass inputs the model accepts") from error
    graph, env = copy_graph(gm)
    for old, shape in recorder.shapes.items():
        if old in env:  # the output node is rebuilt by copy_graph, not mapped
            set_shape(env[old], TensorShape(shape, batch))
    return rebuild(gm, graph)
