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
partial sums stay below 2^24 (the worst-case bound is recorded per op; typical sums are ~1e-3 of
it); the rescale and bias are elementwise, rounded once each, identically everywhere. Eval
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

from fracfx.nn.frozen import FrozenActQuant, FrozenAffine, FrozenWeight
from fracfx.meta import get_binding, get_quant_spec
from fracfx.passes.infra import copy_graph, rebuild

EXACT_LIMIT = 2**24  # float32 represents every integer up to this exactly
_BATCHNORMS = (nn.BatchNorm2d, nn.BatchNorm3d)


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


def _attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    owner, _, name = node.target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _batchnorm_as_affine(bn: nn.Module, rank: int) -> FrozenAffine:
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var.float() + bn.eps)
    shift = (bn.bias.detach().float() if bn.affine else 0.0) - bn.running_mean.float() * scale
    shape = (-1,) + (1,) * rank
    return FrozenAffine(scale.reshape(shape), shift.reshape(shape))


def _integerize(gm: fx.GraphModule, graph: fx.Graph, node: fx.Node, new_modules: dict) -> None:
    """Rewrite one quantized op as integer op + FrozenAffine rescale; leave it if that is not possible."""
    spec, binding = get_quant_spec(node), get_binding(node)
    matmul = spec.kind == "matmul"
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
        shape = (-1,) + (1,) * (weight.codes.dim() - 2) if spec.kind == "conv" else (-1,)
        scale = (acts[0].scale * weight.scale).reshape(shape)
        bias = None if bias_node is None else _attr(gm, bias_node).detach().float().reshape(shape)
        if bias_node is not None:
            _set_slot(node, where, None)
    for operand in act_nodes + ([] if matmul else [weight_node]):
        new_modules[operand.target] = _centered(gm.get_submodule(operand.target))
    target = binding.grad.rpartition(".")[0] + ".rescale"
    new_modules[target] = FrozenAffine(scale, bias)
    with graph.inserting_after(node):
        rescale = graph.call_module(target, (node,))
    node.replace_all_uses_with(rescale, delete_user_cb=lambda user: user is not rescale)


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
    for node in reversed(list(graph.nodes)):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    return rebuild(gm, graph, new_modules)


def _centered(module: nn.Module) -> nn.Module:
    if isinstance(module, FrozenActQuant):
        return FrozenActQuant(module.bits, module.scale, module.zero_point, centered=True)
    return FrozenWeight(module.bits, module.codes, module.scale, module.zero_point, module.axis, centered=True)


def partial_sum_bound(frozen: fx.GraphModule) -> dict[str, float]:
    """Per integer conv/linear: worst-case |partial sum| / 2^24 (< 1: exact in any summation order).

    The bound is max |q_x - zp_x| times the largest per-channel L1 norm of q_w - zp_w.
    """
    found = {}
    for node in frozen.graph.nodes:
        if node.op != "call_function" or get_quant_spec(node) is None or len(node.args) < 2:
            continue
        mods = [frozen.get_submodule(a.target) if isinstance(a, fx.Node) and a.op == "call_module" else None for a in node.args[:2]]
        act, weight = mods
        if not (isinstance(act, FrozenActQuant) and isinstance(weight, FrozenWeight) and act.centered and weight.centered):
            continue
        x_max = max(int(act.zero_point), act.qmax - int(act.zero_point))
        w = (weight.codes - weight._broadcast(weight.zero_point)).abs().float().movedim(weight.axis, 0)
        found[node.name] = x_max * w.reshape(w.shape[0], -1).sum(dim=1).max().item() / EXACT_LIMIT
    return found
