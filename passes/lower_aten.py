"""lower_aten: make a torch.export (ATen-level) graph one that the other passes can work on.

On a symbolically traced graph only F.dropout(x, p, training=self.training) calls change: fx
baked the flag (timm's GhostNet head, in the root forward, which cannot be a leaf), so they
become nn.Dropout(p) modules that train()/eval() switch. On an exported graph (fracfx.passes.capture, mode
"export"), each rewrite keeps the op's nn_module_stack, so module paths still name the owner:

    aten.addmm(bias, x, W)          W a parameter (Hugging Face Conv1D, W is (in, out)):
                                    aten.linear(x, aten.t(W), bias), the same gemm bit for bit,
                                    so the weight quantizer sees W.t() with output channels first;
                                    where x is a (B*T, C) view of (B, T, C) and the result is only
                                    reshaped, the linear takes the (B, T, C) tensor (batch first)
    aten.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, scale)
                                    torch.matmul(q, k^T) * scale -> causal/explicit mask ->
                                    softmax -> Dropout -> torch.matmul(., v) -> FusedAttention:
                                    the QK^T and AV products become matmuls that annotate_quant
                                    quantizes, as the fx path does for nn.MultiheadAttention; the
                                    decomposition equals the fused kernel only up to float
                                    rounding (~1e-7 relative: eager CPU SDPA runs a flash kernel
                                    whose blocked softmax no composition of ops reproduces), so
                                    the closing fracfx.nn.exported.FusedAttention call returns
                                    SDPA itself on the original arguments while every quantizer
                                    of the two products is off (bits 0 stays bit-exact)
    aten.dropout(x, p, train)       an nn.Dropout(p) call_module, and
    aten.batch_norm(..., training)  a fracfx.nn.exported.ModeBatchNorm call_module: export bakes
                                    the model's mode into both; as modules, train()/eval() switch
                                    them again (dropout with p == 0 disappears)

The new modules live under `fracfx_lowered.<node>`; parameters stay where the graph reads them.
"""

from __future__ import annotations

import collections
import math

import torch
import torch.fx as fx
from torch import nn
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function

from fracfx.meta import MODULE_STACK
from fracfx.nn.exported import FusedAttention, ModeBatchNorm
from fracfx.passes.infra import attr, copy_graph, graph_pass, rebuild

LOWERED_ROOT = "fracfx_lowered"
aten = torch.ops.aten


def _arguments(node: fx.Node) -> dict:
    normalized = normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    return dict(normalized.kwargs)


def _is_parameter(gm: fx.GraphModule, node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    value = attr(gm, node.target)
    return isinstance(value, torch.Tensor) and value.dim() == 2


_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _unflattened(node: fx.Node, x):
    """Conv1D flattens (B, T, C) to (B*T, C) for addmm and views the result back: the linear then
    takes the (B, T, C) input itself (the same gemm; DFQ needs the batch first on every operand)."""
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target in _RESHAPES and len(x.users) == 1):
        return x
    source = x.args[0]
    if not isinstance(source, fx.Node) or "val" not in source.meta or "val" not in x.meta:
        return x
    before, after = source.meta["val"].shape, x.meta["val"].shape
    if len(before) < 2 or before[-1] != after[-1]:
        return x
    if not all(u.op == "call_function" and u.target in _RESHAPES for u in node.users):
        return x
    return source


class _Lowering:
    def __init__(self, gm: fx.GraphModule, graph: fx.Graph):
        self.gm, self.graph, self.modules = gm, graph, {}

    def module(self, node: fx.Node, module: nn.Module, args, suffix: str = "") -> fx.Node:
        target = f"{LOWERED_ROOT}.{node.name}{suffix}"
        self.modules[target] = module
        module.training = self.gm.training
        new = self.graph.call_module(target, tuple(args))
        new.meta[MODULE_STACK] = node.meta.get(MODULE_STACK)
        return new

    def replace(self, node: fx.Node, new) -> None:
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)

    def dropout(self, node: fx.Node) -> None:
        x, p = node.args[0], node.args[1]
        self._to_module(node, x, p)

    def functional_dropout(self, node: fx.Node) -> None:
        """F.dropout(x, p, training=self.training) traced by fx: the flag is a baked constant."""
        a = _arguments(node)
        if isinstance(a.get("training", True), bool) and not a.get("inplace", False) and isinstance(a.get("p", 0.5), float):
            self._to_module(node, a["input"], a.get("p", 0.5))

    def _to_module(self, node: fx.Node, x, p: float) -> None:
        with self.graph.inserting_before(node):
            self.replace(node, self.module(node, nn.Dropout(p), (x,)) if p > 0 else x)

    def batch_norm(self, node: fx.Node) -> None:
        x, weight, bias, mean, var, _training, momentum, eps = node.args[:8]
        if mean is None or var is None:  # no running statistics: batch statistics in both modes already
            return
        with self.graph.inserting_before(node):
            self.replace(node, self.module(node, ModeBatchNorm(momentum, eps), (x, weight, bias, mean, var)))

    def addmm(self, node: fx.Node) -> None:
        bias, x, weight = node.args[:3]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or not _is_parameter(self.gm, weight):
            return
        x = _unflattened(node, x)
        with self.graph.inserting_before(node):
            transposed = self.graph.call_function(aten.t.default, (weight,))
            linear = self.graph.call_function(aten.linear.default, (x, transposed, bias))
        for new in (transposed, linear):
            new.meta[MODULE_STACK] = node.meta.get(MODULE_STACK)
        self.replace(node, linear)

    def attention(self, node: fx.Node) -> None:
        try:
            a = _arguments(node)
        except Exception:  # noqa: BLE001 - a call fx cannot normalise stays as it is (reported FP32)
            return
        if a.get("enable_gqa") or not isinstance(a.get("dropout_p", 0.0), float) or not isinstance(a.get("is_causal", False), bool):
            return
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        tracer = fx.proxy.GraphAppendingTracer(self.graph)
        tracer.module_stack = collections.OrderedDict(node.meta.get(MODULE_STACK) or {})
        P = lambda n: fx.Proxy(n, tracer) if isinstance(n, fx.Node) else n
        with self.graph.inserting_before(node):
            product = torch.matmul(P(q), P(k).transpose(-2, -1))
            scores = tracer.create_proxy("call_function", _scale_and_mask, (product, P(q), P(mask), a.get("is_causal", False), a.get("scale")), {})
            weights = torch.softmax(scores, dim=-1)
            if a.get("dropout_p", 0.0) > 0:
                weights = P(self.module(node, nn.Dropout(a["dropout_p"]), (weights.node,)))
            out = torch.matmul(weights, P(v))
            fused = FusedAttention((product.node.name, out.node.name), a.get("dropout_p", 0.0), a.get("is_causal", False), a.get("scale"))
            end = self.module(node, fused, (out.node, q, k, v, mask), suffix="_fused")
        self.replace(node, end)


def _scale_and_mask(scores: torch.Tensor, query: torch.Tensor, mask, is_causal: bool, scale) -> torch.Tensor:
    """The scaling and masking of scaled_dot_product_attention between its two products."""
    scores = scores * (1.0 / math.sqrt(query.size(-1)) if scale is None else scale)
    if is_causal:
        keep = torch.ones(scores.size(-2), scores.size(-1), dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(mask.logical_not(), float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores


@graph_pass(writes=(MODULE_STACK,))
def lower_aten(gm: fx.GraphModule, /) -> fx.GraphModule:
    """Return a copy of gm with the ATen ops above rewritten (see the module docstring)."""
    graph, _ = copy_graph(gm)
    lowering = _Lowering(gm, graph)
    rules = {
        aten.dropout.default: lowering.dropout,
        aten.batch_norm.default: lowering.batch_norm,
        aten.addmm.default: lowering.addmm,
        aten.scaled_dot_product_attention.default: lowering.attention,
        F.dropout: lowering.functional_dropout,
    }
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in rules:
            rules[node.target](node)
    return rebuild(gm, graph, lowering.modules)
