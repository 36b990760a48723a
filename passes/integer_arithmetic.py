"""integer_arithmetic: make a frozen graph compute the same float32 bits in any runtime.

In a plain frozen graph each quantized op reads dequantized values (q - zp) * s and runs in float.
A runtime that sums in another order (onnxruntime's MLAS, PyTorch's oneDNN) differs in the last
bit; where that crosses a rounding boundary of the next quantizer one activation moves a whole
step, and in a deep network at 6-8 bits the flips cascade. Measured on a ResNet-18 at 8 bits:
6 of 5e5 activations flipped after the first block, 10 % of the last stage's were off by up to
10 steps, logits off by 5 % of their largest magnitude.

This pass moves the scales out of the op:

    conv(x_q, w_q, b)   ->   FrozenAffine(s_x * s_w[c], b)( conv(q_x - zp_x, q_w - zp_w) )

The op now multiplies and adds small integers, which float32 does exactly in any order while the
partial sums stay below 2^24 (fracfx.export.verify.partial_sum_bound computes the worst case per op;
typical sums are ~1e-3 of it); the rescale and bias are elementwise, rounded once each, identically everywhere. Eval
BatchNorm2d/3d becomes x * a + c with a, c precomputed (onnxruntime's BatchNormalization kernel
rounds differently from PyTorch's). Adds, ReLU, max pooling and clamps are exact already.

In ONNX this is still QuantizeLinear(s) -> Clip -> DequantizeLinear(scale 1) for activations and
DequantizeLinear(scale 1, axis 0) of integer codes for weights, then Mul and Add.
Ops whose operands are not all frozen quantizers (one side FP32) keep the dequantized form.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fracfx._moved import moved_names
from fracfx.meta import CONV, FROZEN, MATMUL, QUANT_BINDING, QUANT_SPEC, get_binding, get_quant_spec
from fracfx.nn.frozen import FrozenActQuant, FrozenAffine, FrozenWeight
from fracfx.passes.infra import attr, copy_graph, graph_pass, rebuild, remove_dead_nodes

_BATCHNORMS = (nn.BatchNorm2d, nn.BatchNorm3d)
__getattr__ = moved_names(__name__, {"partial_sum_bound": "fracfx.export.pipeline", "EXACT_LIMIT": "fracfx.export.pipeline"})


def _slot(node: fx.Node, index: int, name: str):
    if len(node.args) > index:
        return node.args[index], ("arg", index)
    return node.kwargs.get(name), ("kw", name)


def _set_slot(node: fx.Node, where, value) -> None:
    kind, key = where
    if kind == "arg":
        args = list(node.args)
        args[key] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[key] = value
        node.kwargs = kwargs


def _frozen_operand(gm: fx.GraphModule, node, types):
    if isinstance(node, fx.Node) and node.op == "call_module" and len(node.users) == 1:
        module = gm.get_submodule(node.target)
        if isinstance(module, types):
            return module
    return None


def _batchnorm_as_affine(bn: nn.Module, rank: int) -> FrozenAffine:
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var.float() + bn.eps)
    shift = (bn.bias.detach().float() if bn.affine else 0.0) - bn.running_mean.float() * scale
    shape = (-1,) + (1,) * rank
    return FrozenAffine(scale.reshape(shape), shift.reshape(shape))


def _integerize(gm: fx.GraphModule, graph: fx.Graph, node: fx.Node, new_modules: dict) -> None:
    """Rewrite one quantized op as integer op + FrozenAffine rescale; leave it if that is not possible."""
    spec, binding = get_quant_spec(node), get_binding(node)
    matmul = spec.kind == MATMUL
    act_nodes = list(node.args[:2] if matmul else node.args[:1])
    weight_node = None if matmul else (node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
    acts = [_frozen_operand(gm, a, FrozenActQuant) for a in act_nodes]
    weight = None if matmul else _frozen_operand(gm, weight_node, FrozenWeight)
    if any(a is None for a in acts) or (not matmul and weight is None):
        return  # an FP32 operand: the op stays in dequantized form
    bias_node, where = (None, None) if matmul else _slot(node, 2, "bias")
    if bias_node is not None and not (isinstance(bias_node, fx.Node) and bias_node.op == "get_attr"):
        return  # a computed bias: keep the op as it is
    if matmul:
        scale, bias = acts[0].scale * acts[1].scale, None
    else:
        shape = (-1,) + (1,) * (weight.codes.dim() - 2) if spec.kind == CONV else (-1,)
        scale = (acts[0].scale * weight.scale).reshape(shape)
        bias = None if bias_node is None else attr(gm, bias_node.target).detach().float().reshape(shape)
        if bias_node is not None:
            _set_slot(node, where, None)
    for operand in act_nodes + ([] if matmul else [weight_node]):
        new_modules[operand.target] = _centered(gm.get_submodule(operand.target))
    target = binding.grad.rpartition(".")[0] + ".rescale"
    new_modules[target] = FrozenAffine(scale, bias)
    with graph.inserting_after(node):
        rescale = graph.call_module(target, (node,))
    node.replace_all_uses_with(rescale, delete_user_cb=lambda user: user is not rescale)


@graph_pass(reads=(FROZEN, QUANT_SPEC, QUANT_BINDING))
def integer_arithmetic(gm: fx.GraphModule, /) -> fx.GraphModule:
    """Return a copy of a frozen GraphModule in integer-arithmetic form (module docstring)."""
    graph, _ = copy_graph(gm)
    new_modules: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, _BATCHNORMS) and module.track_running_stats and module.running_var is not None:
            new_modules[node.target] = _batchnorm_as_affine(module, 2 if isinstance(module, nn.BatchNorm2d) else 3)
        elif get_binding(node) is not None and get_quant_spec(node) is not None:
            _integerize(gm, graph, node, new_modules)
    remove_dead_nodes(graph, ops=("get_attr",))
    return rebuild(gm, graph, new_modules)


def _centered(module: nn.Module) -> nn.Module:
    if isinstance(module, FrozenActQuant):
        return FrozenActQuant(module.bits, module.scale, module.zero_point, centered=True)
    return FrozenWeight(module.bits, module.codes, module.scale, module.zero_point, module.axis, centered=True)
