"""annotate_blocks (policy): find the regions DFQ gates and mark them on the graph.

A region is one call of a submodule: the nodes whose nn_module_stack holds that call. By default
the gated regions are residual blocks, recognised from the graph alone (no names, no types):
  - the body has one tensor input x (parameters aside) and one output value; of several inputs
    (an exported transformer block also reads the attention mask), the one its residual stream
    starts from is x, when exactly one qualifies;
  - the output is an add, possibly followed by single-input non-compute ops (ReLU, dropout,
    LayerNorm);
  - one operand of that add is x itself (identity shortcut) or a residual sum over x (a chain:
    x1 = x + f(x), out = x1 + g(x1), each add possibly followed by such ops), or both operands
    are computed in the body on disjoint paths that fork at x, and the shortcut is the one with
    fewer compute ops (a strided 1x1 projection conv + BN, or option-A slicing and padding), so
    downsampling blocks are gated too;
  - the body holds at least one quantized op.
If two detected regions nest, the inner one is gated (one decision per op): a stage
(Sequential) of identity blocks is a chain too, but its blocks win.

What a block is in a transformer: the innermost module whose output is such a residual sum.
torchvision's ViT EncoderBlock (x1 = input + drop(attn(ln_1(input))); out = x1 + mlp(ln_2(x1)))
and nn.TransformerEncoderLayer (pre- and post-LN, after replace_attention) are chains: ONE gate
per layer, both sublayers at one precision, "skip" skipping the whole layer (output = input).
Their attention sublayer is no module of its own (ln_1, attention, dropout and the add are
separate calls in EncoderBlock.forward), and regions are module calls, which block_types and
block_globs can name. fracfx's transformer_lm writes each sublayer as its own residual module
(CausalSelfAttention, FeedForward): two gates per layer there, or one with block_types=("Block",).

block_types (class names) or block_globs (fnmatch globs on module paths; `*` crosses dots)
replace the detection; of nested named regions the outer one is gated ("layer2.*" gates the
blocks, not also their downsample Sequentials). Such regions need one tensor input and one
output, and support "skip" only if they are residual too.

Per-sample precision acts along dim 0: every quantized op in a gated block must see the batch
first (checked on the shapes propagate_shapes recorded: an op whose input or output has another size at dim 0, such
as nn.TransformerEncoderLayer(batch_first=False) or a quantized attention over windows folded
into dim 0, is refused;
an example batch size equal to another dim, e.g. the sequence length, would hide that).

Marks (fracfx.meta): BlockSpec on each compute node in a block; BlockPort("input" | "shortcut" |
"output") on the nodes carrying those values. Runs on the captured graph, after propagate_shapes
and before insert_quant.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import operator
from typing import Sequence

import torch
import torch.fx as fx

from fracfx.errors import ConfigError, PassError, UnsupportedGraphError
from fracfx.meta import (
    BLOCK, BLOCK_PORTS, MATMUL, MODULE_STACK, PORT_INPUT, PORT_OUTPUT, PORT_SHORTCUT, QUANT_SPEC, SHAPE, BlockPort, BlockSpec, add_block_port, get_inserted,
    get_quant_spec, get_shape, set_block,
)
from fracfx.passes.infra import copy_graph, graph_pass, rebuild

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
_ADD_METHODS = ("add", "add_")
_OVERRIDE_HINT = (
    "name the gated regions yourself: DFQConfig(block_types=('MyBlock',)) for a module class, or "
    "DFQConfig(block_globs=('layer*.*',)) for module paths"
)


@dataclasses.dataclass
class _Region:
    path: str
    type_name: str
    depth: int  # position in nn_module_stack: deeper calls have larger depth
    nodes: list[fx.Node]
    x: fx.Node | None = None
    out: fx.Node | None = None
    shortcut: fx.Node | None = None


def _type_name(cls) -> str:
    if isinstance(cls, type):
        return cls.__name__
    return str(cls).rsplit(".", 1)[-1].strip("'>")


def _collect_regions(graph: fx.Graph) -> list[_Region]:
    regions: dict[str, _Region] = {}
    for node in graph.nodes:
        stack = node.meta.get(MODULE_STACK) or {}
        for depth, (key, value) in enumerate(stack.items()):
            path, cls = value if isinstance(value, tuple) else (str(value), None)
            regions.setdefault(key, _Region(path, _type_name(cls), depth, [])).nodes.append(node)
    leaf = lambda r: all(n.op == "call_module" and n.target == r.path for n in r.nodes)
    return [r for r in regions.values() if not leaf(r)]


def _find_ports(region: _Region) -> tuple[list[fx.Node], list[fx.Node]]:
    body = set(region.nodes)
    inputs: list[fx.Node] = []
    for node in region.nodes:
        for arg in node.all_input_nodes:
            if arg not in body and arg.op != "get_attr" and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in region.nodes if any(user not in body for user in n.users)]
    return inputs, outputs


def _is_compute(node: fx.Node) -> bool:
    return get_quant_spec(node) is not None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return node.kwargs.get("alpha", 1) == 1
    return node.op == "call_method" and node.target in _ADD_METHODS and node.kwargs.get("alpha", 1) == 1


def _ancestors(node: fx.Node, body: set[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current in seen or current not in body:
            continue
        seen.add(current)
        todo.extend(current.all_input_nodes)
    return seen


def _add_before(node: fx.Node, body: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """The two operands of the add that `node` is, or follows through single-input non-compute ops."""
    while not _is_add(node):  # walk back over trailing ReLU/LayerNorm-like ops
        inner = [a for a in node.all_input_nodes if a in body]
        if node not in body or _is_compute(node) or len(inner) != 1:
            return None
        node = inner[0]
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return (operands[0], operands[1]) if len(operands) == 2 and node in body else None


def _residual_stream(x: fx.Node, body: set[fx.Node]):
    """A test: is a node x, or a residual sum over x (add(stream, branch), branch in the body)?"""
    memo: dict[fx.Node, bool] = {}

    def is_stream(node: fx.Node) -> bool:
        if node is x:
            return True
        if node not in memo:
            memo[node] = False  # while deciding (a DAG has no cycles; this bounds revisits)
            operands = _add_before(node, body)
            memo[node] = operands is not None and any(
                branch in body and branch is not x and is_stream(stream)
                for stream, branch in (operands, operands[::-1])
            )
        return memo[node]

    return is_stream


def _residual_shortcut(region: _Region) -> fx.Node | None:
    """The add's shortcut operand if the region is a residual block, else None."""
    body, x = set(region.nodes), region.x
    operands = _add_before(region.out, body)
    if operands is None:
        return None
    if _residual_stream(x, body)(region.out):  # identity shortcut, or a chain of them
        return x
    a, b = operands
    if a is x or b is x or a not in body or b not in body:
        return None
    ancestors_a, ancestors_b = _ancestors(a, body), _ancestors(b, body)
    if ancestors_a & ancestors_b:
        return None
    for ancestors in (ancestors_a, ancestors_b):
        if not any(x in n.all_input_nodes for n in ancestors):
            return None
    count_a = sum(map(_is_compute, ancestors_a))
    count_b = sum(map(_is_compute, ancestors_b))
    if count_a == count_b:
        return None  # no way to tell the branch from the shortcut
    return a if count_a < count_b else b


def _residual_input(region: _Region, inputs: list[fx.Node], out: fx.Node) -> list[fx.Node]:
    """Of several inputs (a transformer block also reads the attention mask computed outside it),
    the one the block's residual stream starts from: [it] when exactly one is, else all of them."""
    streams = []
    for x in inputs:
        region.x, region.out = x, out
        if _residual_shortcut(region) is not None:
            streams.append(x)
    region.x = region.out = None
    return streams if len(streams) == 1 else inputs


def _has_quantized_op(region: _Region) -> bool:
    return any((spec := get_quant_spec(n)) is not None and spec.quantize for n in region.nodes)


def _select(regions: list[_Region], block_types: Sequence[str], block_globs: Sequence[str]) -> list[_Region]:
    override = bool(block_types or block_globs)
    chosen = []
    for region in regions:
        named = region.type_name in block_types or any(fnmatch.fnmatchcase(region.path, g) for g in block_globs)
        if override and not named:
            continue
        inputs, outputs = _find_ports(region)
        if len(inputs) > 1 and len(outputs) == 1:
            inputs = _residual_input(region, inputs, outputs[0])
        if len(inputs) != 1 or len(outputs) != 1:
            if override:
                raise UnsupportedGraphError(
                    f"gated region '{region.path}' ({region.type_name}) has {len(inputs)} tensor inputs and "
                    f"{len(outputs)} outputs; a gate needs exactly one of each: choose a module that takes one "
                    f"feature map and returns one, or {_OVERRIDE_HINT}"
                )
            continue
        region.x, region.out = inputs[0], outputs[0]
        region.shortcut = _residual_shortcut(region)
        if (override or region.shortcut is not None) and _has_quantized_op(region):
            chosen.append(region)
    if override:  # the user named these regions: a named region swallows named parts of it
        return [r for r in chosen if not any(_nested_in(r, s) for s in chosen if s is not r)]
    return [r for r in chosen if not any(_nested_in(s, r) for s in chosen if s is not r)]


def _nested_in(inner: _Region, outer: _Region) -> bool:
    a, b = set(inner.nodes), set(outer.nodes)
    return a < b or (a == b and inner.depth > outer.depth)


def _per_sample_values(region: _Region) -> list[tuple[fx.Node, fx.Node]]:
    """(op, value) for the values the block's gate and mixed quantizers split into samples along
    dim 0: the block input, and each quantized op's activation operands and output."""
    values = [(region.x, region.x)]
    for node in region.nodes:
        spec = get_quant_spec(node)
        if spec is None or not spec.quantize:
            continue
        operands = node.args[:2] if spec.kind == MATMUL else (node.args[:1] or (node.kwargs.get("input"),))
        values += [(node, v) for v in (*operands, node) if isinstance(v, fx.Node)]
    return values


def _check_batch_first(region: _Region, shapes, batch: int) -> None:
    for op, value in _per_sample_values(region):
        shape = shapes.get(value)
        if shape is not None and (not shape or shape[0] != batch):
            what = "its input" if op is region.x else f"op '{op.name}' sees a tensor that"
            raise UnsupportedGraphError(
                f"block '{region.path}' ({region.type_name}): {what} has shape {shape}, whose dim 0 is not the "
                f"batch size {batch} of example_inputs; DFQ picks one precision per sample along dim 0. Fix: keep "
                f"the batch first in the model (e.g. nn.TransformerEncoderLayer(batch_first=True)), or gate other "
                f"regions ({_OVERRIDE_HINT})"
            )


@graph_pass(reads=(QUANT_SPEC, SHAPE, MODULE_STACK), writes=(BLOCK, BLOCK_PORTS))
def annotate_blocks(gm: fx.GraphModule, /, *, block_types: Sequence[str] = (), block_globs: Sequence[str] = ()) -> fx.GraphModule:
    """Return a copy of gm with its gated blocks marked (see the module docstring)."""
    if any(get_inserted(n) is not None for n in gm.graph.nodes):
        raise PassError("annotate_blocks must run before insert_quant (it reads the model's own module structure)")
    graph, _ = copy_graph(gm)
    order = {node: i for i, node in enumerate(graph.nodes)}
    blocks = sorted(_select(_collect_regions(graph), tuple(block_types), tuple(block_globs)), key=lambda r: order[r.nodes[0]])
    if not blocks:
        found = "no module matched block_types/block_globs" if (block_types or block_globs) else "no residual block was found"
        raise UnsupportedGraphError(f"DFQ has nothing to gate: {found} (a gated block must contain a quantized op); {_OVERRIDE_HINT}")
    shapes = {n: entry.shape for n in graph.nodes if (entry := get_shape(n)) is not None}
    batch = next((get_shape(n).batch for n in shapes), None)
    if batch is None:
        raise ConfigError("annotate_blocks needs the shapes of the example inputs: run propagate_shapes first")
    for index, region in enumerate(blocks):
        if region.x not in shapes:
            raise UnsupportedGraphError(f"the input of block '{region.path}' is not a tensor; {_OVERRIDE_HINT}")
        _check_batch_first(region, shapes, batch)
        spec = BlockSpec(index, region.path, region.type_name, shapes[region.x][1:], region.shortcut is not None)
        for node in region.nodes:
            if _is_compute(node):
                set_block(node, spec)
        add_block_port(region.x, BlockPort(PORT_INPUT, spec))
        if region.shortcut is not None:
            add_block_port(region.shortcut, BlockPort(PORT_SHORTCUT, spec))
        add_block_port(region.out, BlockPort(PORT_OUTPUT, spec))
    return rebuild(gm, graph)
