"""replace_attention: open nn.MultiheadAttention up into the ops fracfx quantizes.

torch.fx keeps torch.nn modules as leaves, so every nn.MultiheadAttention (and every
nn.TransformerEncoderLayer / nn.TransformerEncoder, which wrap one and may take a fused fast
path) is one opaque call_module node that annotate_quant can only report as unsupported. This
pass replaces each such node, in place, with the ops of fracfx.nn.attention.multi_head_attention
(and the layer's norms, feed-forward and residual adds around it):

    F.linear x3 (Q, K, V) -> torch.matmul (QK^T) -> softmax -> Dropout -> torch.matmul (AV) -> F.linear

so annotate_quant/insert_quant quantize the four projections and the two matmuls like any op
and annotate_cost counts their MACs. Parameters are read by get_attr of their original paths
(`...self_attention.in_proj_weight`, `...out_proj.weight`), so parameter names and state_dict
keys are unchanged and the parameters are shared with the input GraphModule, as in every pass.
Attention dropout becomes an nn.Dropout node (`<attention path>.dropout`) so train()/eval()
still switch it; nothing else is added. New nodes carry nn_module_stack of the replaced module,
so module paths (keep_fp32 globs, reports, block detection) still name it.

Why a graph pass and not a module swap before tracing: the swap would live inside capture (the
only place a deep copy exists), hiding a policy decision in tracing and missing GraphModules
that users trace themselves; as a pass it is GraphModule in, new GraphModule out, one named
pipeline step that can be switched off (QuantConfig(replace_attention=False)) and tested alone.
Running the same function on fx proxies keeps one definition of the arithmetic (tested against
nn.MultiheadAttention), with no retracing of the whole model.

Left as they are: modules named in `keep` (paths or class names, like QuantConfig.leaf_modules),
subclasses that override forward, and nn.TransformerEncoder whose layers are not plain
nn.TransformerEncoderLayer. Difference from eager PyTorch: nn.TransformerEncoder's nested-tensor
fast path (eval, no grad, with src_key_padding_mask) returns 0 at padded positions; the
replacement computes them like training does. Non-padded positions agree.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import operator
import types
from typing import Callable, Sequence

import torch.fx as fx
from torch import nn

from fracfx.nn.attention import multi_head_attention
from fracfx.errors import UnsupportedGraphError
from fracfx.meta import MODULE_STACK
from fracfx.passes.infra import copy_graph, graph_pass, rebuild

_MHA_PARAMS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v")


class _Emitter:
    """Records ops into `graph` at its insertion point, as the module at some path would run them."""

    def __init__(self, gm: fx.GraphModule, graph: fx.Graph, node: fx.Node, new_modules: dict[str, nn.Module]):
        self.gm, self.new_modules = gm, new_modules
        self.tracer = fx.proxy.GraphAppendingTracer(graph)
        self.tracer.module_stack = collections.OrderedDict(node.meta.get(MODULE_STACK) or {})

    @contextlib.contextmanager
    def scope(self, path: str, cls: type):
        stack = self.tracer.module_stack
        if path in stack:  # already inside it (the replaced module itself)
            yield
            return
        stack[path] = (path, cls)
        try:
            yield
        finally:
            stack.pop(path)

    def value(self, arg):
        return fx.Proxy(arg, self.tracer) if isinstance(arg, fx.Node) else arg

    def attr(self, target: str) -> fx.Proxy:
        return self.tracer.create_proxy("get_attr", target, (), {})

    def call(self, target: str, *args) -> fx.Proxy:
        module = self.new_modules[target] if target in self.new_modules else self.gm.get_submodule(target)
        with self.scope(target, type(module)):
            return self.tracer.create_proxy("call_module", target, args, {})

    def dropout(self, path: str, p: float) -> Callable | None:
        if p <= 0:
            return None
        target = f"{path}.dropout"
        self.new_modules[target] = nn.Dropout(p)
        return lambda x: self.call(target, x)


def _mha_view(emit: _Emitter, path: str, mha: nn.MultiheadAttention) -> types.SimpleNamespace:
    """nn.MultiheadAttention's attributes, with graph values (get_attr proxies) for its parameters."""
    def param(name):
        owner, _, leaf = name.rpartition(".")
        return None if getattr(mha.get_submodule(owner), leaf) is None else emit.attr(f"{path}.{name}")

    return types.SimpleNamespace(
        batch_first=mha.batch_first, num_heads=mha.num_heads, head_dim=mha.head_dim,
        add_zero_attn=mha.add_zero_attn, _qkv_same_embed_dim=mha._qkv_same_embed_dim,
        **{name: param(name) for name in _MHA_PARAMS},
        out_proj=types.SimpleNamespace(weight=param("out_proj.weight"), bias=param("out_proj.bias")),
    )


def _attend(emit, path, mha, query, key, value, **kwargs):
    with emit.scope(path, type(mha)):
        return multi_head_attention(_mha_view(emit, path, mha), query, key, value, dropout=emit.dropout(path, mha.dropout), **kwargs)


def _expand_mha(emit, path, mha, *, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal):
    return _attend(
        emit, path, mha, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
        attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
    )


def _expand_encoder_layer(emit, path, layer, *, src, src_mask, src_key_padding_mask, is_causal):
    """nn.TransformerEncoderLayer's slow path (its _sa_block and _ff_block), which the fast path equals."""
    def sa(x):
        out, _ = _attend(emit, f"{path}.self_attn", layer.self_attn, x, x, x, key_padding_mask=src_key_padding_mask,
                         need_weights=False, attn_mask=src_mask, is_causal=is_causal)
        return emit.call(f"{path}.dropout1", out)

    def ff(x):
        x = emit.call(f"{path}.linear1", x)
        x = emit.call(f"{path}.activation", x) if isinstance(layer.activation, nn.Module) else layer.activation(x)
        return emit.call(f"{path}.dropout2", emit.call(f"{path}.linear2", emit.call(f"{path}.dropout", x)))

    x = src
    if layer.norm_first:
        x = x + sa(emit.call(f"{path}.norm1", x))
        return x + ff(emit.call(f"{path}.norm2", x))
    x = emit.call(f"{path}.norm1", x + sa(x))
    return emit.call(f"{path}.norm2", x + ff(x))


def _expand_encoder(emit, path, encoder, *, src, mask, src_key_padding_mask, is_causal):
    x = src
    for i, layer in enumerate(encoder.layers):
        with emit.scope(f"{path}.layers.{i}", type(layer)):
            x = _expand_encoder_layer(emit, f"{path}.layers.{i}", layer, src=x, src_mask=mask,
                                      src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
    return x if encoder.norm is None else emit.call(f"{path}.norm", x)


def _plain(module: nn.Module, cls: type) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


# module class -> (expansion, arguments that must be Python constants, extra support check)
_EXPANSIONS = {
    nn.MultiheadAttention: (_expand_mha, ("need_weights", "average_attn_weights", "is_causal"), None),
    nn.TransformerEncoderLayer: (_expand_encoder_layer, ("is_causal",), lambda m: _plain(m.self_attn, nn.MultiheadAttention)),
    nn.TransformerEncoder: (_expand_encoder, ("is_causal",), lambda m: all(_plain(l, nn.TransformerEncoderLayer) and _plain(l.self_attn, nn.MultiheadAttention) for l in m.layers)),
}


def _expansion_for(module: nn.Module):
    for cls, (expand, constants, supported) in _EXPANSIONS.items():
        if _plain(module, cls) and (supported is None or supported(module)):
            return expand, constants
    return None


def _bound_arguments(module: nn.Module, node: fx.Node, constants: Sequence[str]) -> dict:
    bound = inspect.signature(type(module).forward).bind(module, *node.args, **node.kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    del arguments["self"]
    for name in constants:
        if isinstance(arguments[name], fx.Node):
            raise UnsupportedGraphError(
                f"replace_attention: {name} of '{node.target}' ({type(module).__name__}) is a traced value, so the "
                f"attention ops cannot be chosen; fix: pass {name} as a Python constant (concrete_args), or keep the "
                f"module opaque in FP32 with leaf_modules=({node.target!r},) or QuantConfig(replace_attention=False)"
            )
    return arguments


def _substitute(graph: fx.Graph, node: fx.Node, value) -> None:
    """Make every use of `node` use `value` (a proxy, None, or a tuple of them) instead."""
    if isinstance(value, tuple):
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node and isinstance(user.args[1], int):
                _substitute(graph, user, value[user.args[1]])
                graph.erase_node(user)
        if node.users:  # the tuple itself is used: build it
            with graph.inserting_before(node):
                value = graph.call_function(tuple, ([v.node if isinstance(v, fx.Proxy) else v for v in value],))
    if isinstance(value, fx.Proxy):
        value = value.node
    if isinstance(value, fx.Node):
        node.replace_all_uses_with(value)
        return
    for user in list(node.users):  # a constant (None): rewrite the users' arguments
        user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)


@graph_pass(writes=(MODULE_STACK,))
def replace_attention(gm: fx.GraphModule, /, *, keep: Sequence[str] = ()) -> fx.GraphModule:
    """Return a copy of gm with each attention call_module node replaced by its ops (see module docstring)."""
    graph, _ = copy_graph(gm)
    new_modules: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        found = _expansion_for(module)
        if found is None or node.target in keep or type(module).__name__ in keep:
            continue
        expand, constants = found
        emit = _Emitter(gm, graph, node, new_modules)
        arguments = {name: emit.value(v) for name, v in _bound_arguments(module, node, constants).items()}
        with graph.inserting_before(node), emit.scope(node.target, type(module)):
            result = expand(emit, node.target, module, **arguments)
        _substitute(graph, node, result)
        graph.erase_node(node)
    return rebuild(gm, graph, new_modules)
