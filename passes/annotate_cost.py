"""annotate_cost: MACs per sample of every compute op, from the shapes propagate_shapes recorded.

    MACs = prod(output shape) * multiplies per output element / batch size
    multiplies per output element: conv and linear prod(weight.shape[1:]); matmul the left
    operand's last dim

Results are stored as meta.OpCost on the compute nodes; ops whose shapes are unknown (a value
the example run never produced) get none.
"""

from __future__ import annotations

import math

import torch.fx as fx

from fracfx.meta import MATMUL, OP_COST, QUANT_SPEC, QUANTIZABLE_KINDS, SHAPE, OpCost, get_quant_spec, get_shape, set_op_cost
from fracfx.passes.infra import attr, copy_graph, graph_pass, rebuild


def _shape(value) -> tuple[int, ...] | None:
    entry = get_shape(value) if isinstance(value, fx.Node) else None
    return None if entry is None else entry.shape


def _contraction(gm: fx.GraphModule, node: fx.Node, kind: str) -> int | None:
    """Multiplies per output element, None when an operand's shape is unknown."""
    if kind == MATMUL:
        left = _shape(node.args[0])
        return None if not left else left[-1]
    if node.op == "call_module":
        return math.prod(attr(gm, node.target).weight.shape[1:])
    weight = _shape(node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None))
    return None if weight is None else math.prod(weight[1:])


@graph_pass(reads=(QUANT_SPEC, SHAPE), writes=(OP_COST,))
def annotate_cost(gm: fx.GraphModule, /) -> fx.GraphModule:
    """Return a copy of gm whose supported compute nodes carry OpCost (MACs per sample)."""
    graph, _ = copy_graph(gm)
    for node in graph.nodes:
        spec, shape = get_quant_spec(node), get_shape(node)
        if spec is None or spec.kind not in QUANTIZABLE_KINDS or shape is None:
            continue
        contraction = _contraction(gm, node, spec.kind)
        if contraction is None:
            continue
        total = math.prod(shape.shape) * contraction
        set_op_cost(node, OpCost(macs_per_sample=total // shape.batch, output_shape=shape.shape))
    return rebuild(gm, graph)
