"""insert_quant (mechanism): put explicit quantizer nodes around every op the policy selected.

    conv/linear:  x -> ActQuant -> F.conv/F.linear(x_q, WeightQuant(weight), bias) -> GradQuant -> y
    matmul:       both operands -> ActQuant -> matmul -> GradQuant -> y

nn.Conv/nn.Linear call_module nodes become the functional op on get_attr'd parameters, so the
weight quantizer is a visible node and parameter names (state_dict keys) are unchanged; a
subclass with its own forward, kept as a leaf (timm's Conv2dSame), is called through
torch.func.functional_call with its weight replaced by the quantized one. New
quantizer modules live under `fracfx_quant.<op>`; each compute node records a QuantBinding.

A scaled_dot_product_attention that lower_aten decomposed ends in a FusedAttention call: it gets
the quantizers of its two products as extra (get_attr) arguments, to fall back to the fused op
while all of them are off, and is marked Inserted (role FUSED_ATTENTION) for freeze_precision.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fracfx.meta import (
    ACT_QUANT, FUSED_ATTENTION, GRAD_QUANT, INSERTED, MATMUL, QUANT_BINDING, QUANT_SPEC, WEIGHT_QUANT, Inserted, QuantBinding,
    get_inserted, get_quant_spec, set_binding, set_inserted,
)
from fracfx.nn.exported import FusedAttention
from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant
from fracfx.passes.infra import attr, copy_graph, graph_pass, rebuild

QUANT_ROOT = "fracfx_quant"
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


_ALIAS_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute", "squeeze", "unsqueeze", "expand",
    "expand_as", "narrow", "select", "unbind", "split", "chunk", "contiguous", "t", "detach", "as_strided", "movedim",
    "swapaxes", "unfold", "type_as", "to", "float", "__getitem__", "tensor_split", "split_with_sizes", "diagonal",
}
_ALIAS_FUNCTIONS = {"getitem", *_ALIAS_METHODS, "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout2d", "dropout3d"}
_IN_PLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor", "imatmul", "ilshift", "irshift"}
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def _written_in_place(gm: fx.GraphModule, node: fx.Node, _seen: set | None = None) -> bool:
    """Whether a consumer of node's output may write to it in place (then GradQuant copies).

    Conservative: in-place modules (inplace=True), methods and functions whose name ends in "_",
    in-place operators (`x += y`), any call passing inplace=True or a literal True after the
    input, and leaf modules from outside torch.nn (their forward is not visible) count as
    writers; through consumers that may return the value itself or a view of it (nn.Identity,
    dropout, view/reshape/getitem and the like, ATen ops whose schema returns an alias) the
    search goes on, since a write to an alias writes the quantizer's output too.
    """
    seen = set() if _seen is None else _seen
    for user in node.users:
        if user in seen:
            continue
        seen.add(user)
        aliases = False
        if user.op == "call_module":
            module = attr(gm, user.target)
            if isinstance(module, FusedAttention):  # writes nothing; may return its first input
                aliases = True
            elif getattr(module, "inplace", False) or not type(module).__module__.startswith("torch.nn"):
                return True
            else:
                aliases = isinstance(module, _ALIAS_MODULES)
        elif isinstance(user.target, torch._ops.OpOverload):  # a torch.export graph: the schema says
            if user.target._schema.is_mutable:
                return True
            aliases = any(r.alias_info is not None for r in user.target._schema.returns)
        elif user.op in ("call_function", "call_method"):
            name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
            if name.endswith("_") or name in _IN_PLACE_OPERATORS or user.kwargs.get("inplace") is True or any(a is True for a in user.args[1:]):
                return True
            aliases = name in _ALIAS_FUNCTIONS
        if aliases and _written_in_place(gm, user, seen):
            return True
    return False


def _base_class(module: nn.Module) -> type:
    return next(cls for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) if isinstance(module, cls))


def _slot(node: fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _functional_module_call(gm: fx.GraphModule, graph: fx.Graph, node: fx.Node, x: fx.Node, weight: fx.Node):
    """Rebuild a Conv/Linear call_module as its functional form on the quantized x and weight."""
    module = attr(gm, node.target)
    bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
    if isinstance(module, nn.Linear):
        return graph.call_function(F.linear, (x, weight, bias))
    padding = module.padding
    if module.padding_mode != "zeros":
        x = graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode})
        padding = 0
    conv = _CONV_FUNCTIONS[len(module.kernel_size)]
    return graph.call_function(conv, (x, weight, bias, module.stride, padding, module.dilation, module.groups))


@dataclasses.dataclass
class _Inserter:
    """Adds quantizer nodes (and their modules, under QUANT_ROOT) to `graph` for one pass run."""

    gm: fx.GraphModule
    graph: fx.Graph
    act: Callable[[], ActQuant]
    weight: Callable[[], WeightQuant]
    modules: dict[str, nn.Module] = dataclasses.field(default_factory=dict)

    def add(self, name: str, module: nn.Module, args, serves: fx.Node, role: str) -> fx.Node:
        target = f"{QUANT_ROOT}.{name}"
        self.modules[target] = module
        inserted = self.graph.call_module(target, args)
        set_inserted(inserted, Inserted(role=role, serves=serves.name))
        return inserted

    def matmul(self, node: fx.Node) -> tuple[fx.Node, list[fx.Node], str | None]:
        """Both operands quantized as activations: (compute, act nodes, no weight)."""
        acts = [self.add(f"{node.name}.act{i}", self.act(), (operand,), node, ACT_QUANT) for i, operand in enumerate(node.args[:2])]
        return self.graph.call_function(torch.matmul, tuple(acts)), acts, None

    def weighted(self, node: fx.Node) -> tuple[fx.Node, list[fx.Node], str | None]:
        """conv/linear: input and weight quantized; a module call becomes its functional form."""
        act = self.add(f"{node.name}.act", self.act(), (_slot(node, 0, "input"),), node, ACT_QUANT)
        raw_weight = self.graph.get_attr(f"{node.target}.weight") if node.op == "call_module" else _slot(node, 1, "weight")
        weight = self.add(f"{node.name}.weight", self.weight(), (raw_weight,), node, WEIGHT_QUANT)
        if node.op == "call_module":
            module = attr(self.gm, node.target)
            if type(module).forward is not _base_class(module).forward:  # its own forward, kept as a leaf
                call = self.graph.call_function(torch.func.functional_call,
                                                (self.graph.get_attr(node.target), {"weight": weight}, (act, *node.args[1:]), dict(node.kwargs)))
                return call, [act], weight.target
            return _functional_module_call(self.gm, self.graph, node, act, weight), [act], weight.target
        args, kwargs = list(node.args), dict(node.kwargs)
        for index, key, value in ((0, "input", act), (1, "weight", weight)):
            if len(args) > index:
                args[index] = value
            else:
                kwargs[key] = value
        return self.graph.call_function(node.target, tuple(args), kwargs), [act], weight.target


def _link_attention(gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Append to each FusedAttention call the quantizers serving its two products (module docstring)."""
    serving: dict[str, list[str]] = {}
    for node in graph.nodes:
        inserted = get_inserted(node)
        if inserted is not None and inserted.role in (ACT_QUANT, GRAD_QUANT):
            serving.setdefault(inserted.serves, []).append(node.target)
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target.startswith(f"{QUANT_ROOT}."):  # the new quantizers are not in gm yet
            continue
        attention = attr(gm, node.target)
        if not isinstance(attention, FusedAttention):
            continue
        with graph.inserting_before(node):
            quantizers = [graph.get_attr(target) for name in attention.products for target in serving.get(name, ())]
        node.args = (*node.args, *quantizers)
        set_inserted(node, Inserted(role=FUSED_ATTENTION, serves=attention.products[-1]))


@graph_pass(reads=(QUANT_SPEC,), writes=(INSERTED, QUANT_BINDING))
def insert_quant(
    gm: fx.GraphModule,
    /,
    *,
    act_bits: int = 8,
    weight_bits: int = 8,
    grad_bits: int = 8,
    act_momentum: float = 0.9,
    stochastic_grad: bool = True,
    integer_zero_point: bool = False,
) -> fx.GraphModule:
    """Return a copy of gm with quantizer nodes around every node whose QuantSpec says quantize."""
    graph, _ = copy_graph(gm)
    inserter = _Inserter(
        gm, graph, act=lambda: ActQuant(act_bits, act_momentum, integer_zero_point),
        weight=lambda: WeightQuant(weight_bits, integer_zero_point=integer_zero_point),
    )
    selected = [node for node in graph.nodes if (spec := get_quant_spec(node)) is not None and spec.quantize]
    for seed, node in enumerate(selected):  # each gradient quantizer its own rounding stream
        with graph.inserting_before(node):
            compute, acts, weight = (inserter.matmul if get_quant_spec(node).kind == MATMUL else inserter.weighted)(node)
            compute.meta.update(node.meta)
            grad_quant = GradQuant(grad_bits, stochastic_grad, seed=seed, copy_output=_written_in_place(gm, node))
            grad = inserter.add(f"{node.name}.grad", grad_quant, (compute,), node, GRAD_QUANT)
        set_binding(compute, QuantBinding(act=tuple(a.target for a in acts), weight=weight, grad=grad.target))
        node.replace_all_uses_with(grad)
        graph.erase_node(node)
    _link_attention(gm, graph)
    return rebuild(gm, graph, inserter.modules)
