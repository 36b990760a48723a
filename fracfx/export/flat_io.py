"""Positional tensors in, a flat tuple of tensors out: the calling convention an ONNX graph has.

A model captured with torch.export (Hugging Face models: keyword inputs such as input_ids=...,
a ModelOutput dataclass out) keeps its own calling convention through transform and freeze (the
GraphModule's pytree codegen). Exporting needs the flat form underneath, which the graph already
has: one placeholder per input tensor (named like the keyword: input_ids, attention_mask) and
one output per tensor leaf (named like the dataclass field: logits). A model captured with
torch.fx already takes positional tensors and passes through unchanged.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch.fx.graph import _PyTreeCodeGen
from torch.utils import _pytree as pytree

from fracfx.errors import ExportError


def _pytree_info(gm: fx.GraphModule):
    codegen = gm.graph._codegen
    return codegen.pytree_info if isinstance(codegen, _PyTreeCodeGen) else None


def positional(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` taking its input tensors positionally (placeholder order) and returning the flat
    output tensors; the same modules and meta (no copy of the weights). gm itself if it already does."""
    gm = traceable_sizes(onnx_compatible(gm))
    if _pytree_info(gm) is None:
        return gm
    graph, mapping = fx.Graph(), {}
    graph.graph_copy(gm.graph, mapping, return_output_node=False)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat = output.args[0]
    graph.output(fx.node.map_arg(tuple(flat) if isinstance(flat, (tuple, list)) else flat, mapping.__getitem__))
    flat_gm = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    flat_gm.meta.update(gm.meta)
    flat_gm.train(gm.training)
    return flat_gm


def traceable_sizes(gm: fx.GraphModule) -> fx.GraphModule:
    """gm with torch.export's size arithmetic in a form torch.onnx's tracer records as shape ops.

    The tracer records Tensor.size(d) (a traced 0-dim value) and the Python-level calls that take
    it (x.view(n, ...), x.expand(n, ...), torch.arange(n)); an `aten.sym_size.int` call returns a
    plain int that it bakes in as a constant (the example's batch, and the file fails at any
    other batch), and ATen overloads (aten.view.default, ...) refuse traced values. So
    sym_size.int(x, d) becomes x.size(d), and each ATen op that reads a size becomes the Python
    call of the same name. Only export-captured graphs with a dynamic batch have these nodes.
    """
    sizes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int]
    if not sizes:
        return gm
    graph, mapping = fx.Graph(), {}
    graph._codegen = gm.graph._codegen
    graph.output(graph.graph_copy(gm.graph, mapping))
    pending, symbolic = [], set()
    for node in sizes:
        new = mapping[node]
        with graph.inserting_before(new):
            size = graph.call_method("size", new.args, new.kwargs)
        size.meta.update(new.meta)
        new.replace_all_uses_with(size)
        graph.erase_node(new)
        pending.extend(size.users)
        symbolic.add(size)
    seen = set()
    while pending:
        node = pending.pop()
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if getattr(node.target, "__module__", None) == "_operator":  # size arithmetic: its users read a size too
            pending.extend(node.users)
            symbolic.add(node)
        elif isinstance(node.target, torch._ops.OpOverload):
            _as_python_call(graph, node, symbolic)
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    out.train(gm.training)
    return out


def _as_python_call(graph: fx.Graph, node: fx.Node, symbolic: set[fx.Node]) -> None:
    """aten.NAME.overload(x, ...) -> x.NAME(...) when x is a tensor (x.view(n, ...)), else
    torch.NAME(...) (torch.arange(n)); `symbolic` holds the nodes that are sizes, not tensors."""
    name = node.target.overloadpacket.__name__
    first = node.args[0] if node.args else None
    if isinstance(first, fx.Node) and first not in symbolic and hasattr(torch.Tensor, name):
        with graph.inserting_before(node):
            call = graph.call_method(name, node.args, node.kwargs)
    elif hasattr(torch, name):
        with graph.inserting_before(node):
            call = graph.call_function(getattr(torch, name), node.args, node.kwargs)
    else:
        return
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)


def _diff(x: torch.Tensor, n: int = 1, dim: int = -1, prepend=None, append=None) -> torch.Tensor:
    """torch.diff from slices and a subtraction (ONNX has no diff; HF's masks call it on position ids)."""
    x = torch.cat([t for t in (prepend, x, append) if t is not None], dim) if prepend is not None or append is not None else x
    for _ in range(n):
        x = x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)
    return x


def _cumsum(x: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:
    """torch.cumsum, with a bool input counted as int64 first (as torch does; ONNX CumSum takes no bool)."""
    return torch.cumsum(x.long() if x.dtype == torch.bool else x, dim, dtype=dtype)


# ATen ops torch.onnx cannot export as captured -> compositions computing the same values
ONNX_REWRITES = {torch.ops.aten.diff.default: _diff, torch.ops.aten.cumsum.default: _cumsum}


def onnx_compatible(gm: fx.GraphModule) -> fx.GraphModule:
    """gm with the ops of ONNX_REWRITES replaced by their compositions (the same values)."""
    found = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ONNX_REWRITES]
    if not found:
        return gm
    graph, mapping = fx.Graph(), {}
    graph._codegen = gm.graph._codegen
    graph.output(graph.graph_copy(gm.graph, mapping))
    for node in found:
        mapping[node].target = ONNX_REWRITES[node.target]
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    out.train(gm.training)
    return out


def flat_inputs(gm: fx.GraphModule, inputs) -> tuple[torch.Tensor, ...]:
    """The input tensors in gm's placeholder order: a tensor or tuple as given; for a model with
    keyword inputs, a dict {name: tensor} flattened by the captured input spec."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    info = _pytree_info(gm)
    if isinstance(inputs, dict):
        if info is None:
            raise ExportError(f"keyword inputs {sorted(inputs)} given, but the model takes positional inputs; pass a tuple of tensors")
        try:
            return tuple(fx_pytree.tree_flatten_spec(((), inputs), info.in_spec))
        except Exception as error:
            raise ExportError(f"the keyword inputs {sorted(inputs)} do not match the captured model's inputs ({error}); "
                              "pass the same keywords as example_inputs at transform()") from error
    return tuple(inputs)


def output_names(gm: fx.GraphModule, count: int) -> list[str]:
    """ONNX output names: the output dataclass's field names (logits) where the model has them,
    else output / output_0, output_1, ..."""
    info = _pytree_info(gm)
    if info is not None and info.out_spec is not None:
        paths = [path for path, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten([0] * info.out_spec.num_leaves, info.out_spec))[0]]
        names = ["_".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path) or "output" for path in paths]
        if len(names) == count and len(set(names)) == count:
            return names
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def input_names(gm: fx.GraphModule, count: int) -> list[str]:
    """ONNX input names: the placeholders' names (input_ids) for a model with keyword inputs, else input / input_0, ..."""
    if _pytree_info(gm) is not None:
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        if len(names) == count:
            return names
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]
