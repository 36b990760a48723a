"""annotate_quant (policy): decide, for every compute op, whether it is quantized.

Supported ops: nn.Conv1d/2d/3d, nn.Linear, F.conv1d/2d/3d, F.linear, torch.matmul/bmm/mm and `@`;
in a torch.export graph (after lower_aten) aten.conv1d/2d/3d, aten.convolution (not transposed),
aten.linear, aten.matmul/mm/bmm.
Each gets a QuantSpec; ops the config keeps FP32 get quantize=False with the reason. Compute ops
fracfx cannot quantize (other parameterised modules and weight-consuming functions, such as the
fused call inside nn.MultiheadAttention, or modules kept as trace leaves) are annotated too, with
kind "unsupported", so they are reported rather than silently left in FP32.
"""

from __future__ import annotations

import fnmatch
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fracfx.config import FIRST_LAYER, LAST_LAYER
from fracfx.meta import CONV, LINEAR, MATMUL, MODULE_STACK, QUANT_SPEC, QUANTIZABLE_KINDS, UNSUPPORTED, QuantSpec, set_quant_spec
from fracfx.passes.infra import attr, copy_graph, graph_pass, module_path_of, rebuild

_MODULE_KINDS = {nn.Conv1d: CONV, nn.Conv2d: CONV, nn.Conv3d: CONV, nn.Linear: LINEAR}
_FUNCTION_KINDS = {
    F.conv1d: CONV, F.conv2d: CONV, F.conv3d: CONV, F.linear: LINEAR,
    torch.matmul: MATMUL, torch.bmm: MATMUL, torch.mm: MATMUL, operator.matmul: MATMUL,
}
_METHOD_KINDS = {"matmul": MATMUL, "bmm": MATMUL, "mm": MATMUL}
_LOOKUP_MODULES = (nn.Embedding, nn.EmbeddingBag)
_ELEMENTWISE_MODULES = ("_operator", "operator", "torch", "torch.functional", "torch.nn.functional", "builtins")
aten = torch.ops.aten
_ATEN_KINDS = {
    aten.conv1d.default: CONV, aten.conv2d.default: CONV, aten.conv3d.default: CONV,
    aten.conv1d.padding: CONV, aten.conv2d.padding: CONV, aten.conv3d.padding: CONV, aten.linear.default: LINEAR,
    aten.matmul.default: MATMUL, aten.mm.default: MATMUL, aten.bmm.default: MATMUL,
}
_HEAVY_ATEN_NAMES = {
    "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "einsum", "addmm", "baddbmm", "addbmm",
    "bilinear", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention", "_native_multi_head_attention",
    "addmv", "mv", "tensordot",
}
_HEAVY_FUNCTION_NAMES = {
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "einsum", "addmm", "baddbmm",
    "addbmm", "bilinear", "scaled_dot_product_attention", "multi_head_attention_forward",
}


def _op_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """CONV | LINEAR | MATMUL for supported ops, UNSUPPORTED for other compute, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for cls, kind in _MODULE_KINDS.items():
            # a subclass that overrides forward is a leaf only when fx could not trace it (a
            # traceable one is traced through): insert_quant calls it with its weight quantized
            if isinstance(module, cls):
                return kind
        if isinstance(module, _LOOKUP_MODULES):
            return None
        return UNSUPPORTED if any(p.dim() >= 2 for p in module.parameters()) else None
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):  # a torch.export graph
        if node.target is aten.convolution.default and not node.args[6]:  # not transposed
            return CONV
        if node.target in _ATEN_KINDS:
            return _ATEN_KINDS[node.target]
        return UNSUPPORTED if node.target.overloadpacket.__name__ in _HEAVY_ATEN_NAMES else None
    if node.op == "call_function":
        if node.target in _FUNCTION_KINDS:
            return _FUNCTION_KINDS[node.target]
        if getattr(node.target, "__name__", "") in _HEAVY_FUNCTION_NAMES:
            return UNSUPPORTED
        # a user or library function handed a weight matrix (e.g. torchvision swin's
        # fx-wrapped window attention) computes with it; torch's own elementwise ops, indexing
        # and lookups (x + pos_embedding, layer scale, F.embedding) do not count as compute
        if getattr(node.target, "__module__", None) not in _ELEMENTWISE_MODULES and _takes_weight(gm, node):
            return UNSUPPORTED
    if node.op == "call_method" and node.target in _METHOD_KINDS:
        return _METHOD_KINDS[node.target]
    return None


def _takes_weight(gm: fx.GraphModule, node: fx.Node) -> bool:
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            value = attr(gm, arg.target)
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                return True
    return False


def _type_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if isinstance(node.target, torch._ops.OpOverload):
        return f"aten.{node.target.overloadpacket.__name__}"
    return getattr(node.target, "__name__", str(node.target))


@graph_pass(reads=(MODULE_STACK,), writes=(QUANT_SPEC,))
def annotate_quant(gm: fx.GraphModule, /, *, keep_fp32=(), quantize=QUANTIZABLE_KINDS) -> fx.GraphModule:
    """Return a copy of gm whose compute nodes carry a QuantSpec (see module docstring)."""
    graph, _ = copy_graph(gm)
    found = [(node, _op_kind(gm, node)) for node in graph.nodes]
    found = [(node, kind) for node, kind in found if kind is not None]
    supported = [node for node, kind in found if kind != UNSUPPORTED and kind in quantize]
    pinned = {}
    if supported and FIRST_LAYER in keep_fp32:
        pinned[supported[0]] = f"{FIRST_LAYER} kept FP32"
    if supported and LAST_LAYER in keep_fp32:
        pinned[supported[-1]] = f"{LAST_LAYER} kept FP32"
    globs = [g for g in keep_fp32 if g not in (FIRST_LAYER, LAST_LAYER)]
    for node, kind in found:
        path = module_path_of(node)
        reason = ""
        if kind == UNSUPPORTED:
            reason = "not a supported op (conv/linear/matmul): runs in FP32"
        elif kind not in quantize:
            reason = f"op kind {kind!r} not in quantize={tuple(quantize)}"
        elif node in pinned:
            reason = pinned[node]
        else:
            match = next((g for g in globs if fnmatch.fnmatchcase(path, g)), None)
            if match is not None:
                reason = f"keep_fp32 glob {match!r}"
        set_quant_spec(node, QuantSpec(kind=kind, module_path=path, module_type=_type_name(gm, node), quantize=not reason, reason=reason))
    return rebuild(gm, graph)
