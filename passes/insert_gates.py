"""insert_gates (mechanism): per marked block, a gate subgraph whose mask feeds the block's quantizers.

For block i (BlockPorts from annotate_blocks), right after its input x_i:

    e_i = fracfx_gate.embed.i(x_i)                  GateEmbedding (conv maps) or TokenGateEmbedding
    s_i = fracfx_gate.lstm(e_i[, s_{i-1}])          the ONE shared LSTMCell (no state at block 0)
    l_i = fracfx_gate.head(s_i[0])                  the shared Linear(hidden -> K)
    m_i = fracfx_gate.choice.i(l_i)                 GateChoice: one-hot forward, softmax backward

and inside the block (ops with a QuantBinding from insert_quant):

    ActQuant(x)  -> MixedActQuant(x, m_i)           (same submodule path, state carried over)
    GradQuant(y) -> MixedGradQuant(y, m_i)          (same path; its rounding generator state kept)
    with an "fp32" candidate: y -> fracfx_gate.fp32.<op>(y, m_i, x~, W, ...) before the GradQuant
    with a "skip" candidate:  out_i -> fracfx_gate.skip.i(out_i, shortcut_i, m_i) for its users

The embedding reads x_i in the layout of `embed_layout`; "auto" takes it per block from the
block's first conv/linear/matmul (execution order, quantized or not): a conv reads channels at
dim 1 ("channels_first"), a linear or matmul reads features at the last dim ("tokens"). So the
rule follows what the block itself does with its input, not the input's rank alone: (C, L)
Conv1d maps and (T, C) token sequences have the same rank, as have (C, H, W) maps and swin's
channels-last (H, W, C). A block whose first op reads a permuted copy of its input can be
misread: force the layout with DFQConfig(embed_layout=...).

The gate nodes are ordinary graph nodes: print(gm.graph) shows them.
"""

from __future__ import annotations

import operator
from typing import Sequence

import torch.fx as fx
from torch import nn

from fracfx.config import EMBED_LAYOUTS
from fracfx.nn.mixed import FP32Rows, MixedActQuant, MixedGradQuant, SkipMix
from fracfx.errors import ConfigError, PassError, UnsupportedGraphError
from fracfx.nn.gates import CandidateTable, GateChoice, gate_embedding
from fracfx.meta import (
    BLOCK, BLOCK_PORTS, CONV, FP32_ROWS, GATE_CHOICE, GATE_EMBED, GATE_HEAD, GATE_STATE, GATE_STEP, INSERTED, QUANT_BINDING,
    PORT_INPUT, PORT_OUTPUT, PORT_SHORTCUT, QUANT_SPEC, QUANTIZABLE_KINDS, SKIP_MIX, Inserted, get_block, get_block_ports, get_quant_spec, set_block, set_inserted,
)
from fracfx.passes.infra import attr, copy_graph, gated_ops, graph_pass, rebuild

GATE_ROOT = "fracfx_gate"


def _ports(graph: fx.Graph):
    specs, ports = {}, {PORT_INPUT: {}, PORT_SHORTCUT: {}, PORT_OUTPUT: {}}
    for node in graph.nodes:
        for port in get_block_ports(node):
            specs[port.block.index] = port.block
            ports[port.role][port.block.index] = node
    return specs, ports


def _layouts(graph: fx.Graph, indices, embed_layout: str) -> dict[int, str]:
    """Per block index: where its input's channels are (see the module docstring)."""
    if embed_layout != "auto":
        return dict.fromkeys(indices, embed_layout)
    layouts: dict[int, str] = {}
    for node in graph.nodes:  # execution order: the first conv/linear/matmul of each block decides
        spec, quant = get_block(node), get_quant_spec(node)
        if spec is not None and quant is not None and spec.index not in layouts and quant.kind in QUANTIZABLE_KINDS:
            layouts[spec.index] = "channels_first" if quant.kind == CONV else "tokens"
    return layouts


def _check_blocks(specs, table: CandidateTable) -> None:
    for spec in specs:
        if len(spec.input_shape) < 1:
            raise UnsupportedGraphError(f"the input of block '{spec.module_path}' has no channel dimension; a gate embeds (B, C, ...) or (B, T, C) tensors")
        if table.skip_index is not None and not spec.residual:
            raise ConfigError(
                f"block '{spec.module_path}' has no residual shortcut, so the 'skip' candidate is undefined "
                "there; remove 'skip' from candidates or gate only residual blocks"
            )


@graph_pass(reads=(BLOCK, BLOCK_PORTS, QUANT_BINDING, QUANT_SPEC), writes=(INSERTED, BLOCK))
def insert_gates(
    gm: fx.GraphModule,
    /,
    *,
    candidates: Sequence,
    embed_dims: Sequence[int] = (32, 16),
    hidden: int = 16,
    embed_layout: str = "auto",
) -> fx.GraphModule:
    """Return a copy of gm with a gate per annotated block and mixed quantizers inside it."""
    if embed_layout not in EMBED_LAYOUTS:
        raise ConfigError(f"embed_layout must be one of {EMBED_LAYOUTS}, got {embed_layout!r}")
    table = CandidateTable(tuple(candidates))
    graph, _ = copy_graph(gm)
    specs, ports = _ports(graph)
    if not specs:
        raise PassError("insert_gates found no annotated block: run annotate_blocks first")
    layouts = _layouts(graph, specs, embed_layout)
    _check_blocks(specs.values(), table)
    modules: dict[str, nn.Module] = {
        f"{GATE_ROOT}.lstm": nn.LSTMCell(embed_dims[-1], hidden),
        f"{GATE_ROOT}.head": nn.Linear(hidden, len(table)),
    }

    def add(target, args, role, spec, module=None, op="call_module"):
        if module is not None:
            modules[target] = module
        node = graph.create_node(op, target, tuple(args))
        set_inserted(node, Inserted(role=role, serves=spec.module_path))
        return node

    masks: dict[int, fx.Node] = {}
    state = last = None
    for index in sorted(specs):
        spec, x = specs[index], ports[PORT_INPUT][index]
        embedding = gate_embedding(layouts[index], spec.input_shape, tuple(embed_dims))
        position = {node: i for i, node in enumerate(graph.nodes)}
        anchor = x if last is None or position[x] > position[last] else last
        with graph.inserting_before(anchor.next):
            embed = add(f"{GATE_ROOT}.embed.{index}", (x,), GATE_EMBED, spec, embedding)
            state = add(f"{GATE_ROOT}.lstm", (embed,) if state is None else (embed, state), GATE_STEP, spec)
            h = add(operator.getitem, (state, 0), GATE_STATE, spec, op="call_function")
            logits = add(f"{GATE_ROOT}.head", (h,), GATE_HEAD, spec)
            last = masks[index] = add(f"{GATE_ROOT}.choice.{index}", (logits,), GATE_CHOICE, spec, GateChoice(table))
        set_block(last, spec)

    _mix_quantizers(gm, graph, table, masks, modules)
    if table.skip_index is not None:
        replaced: dict[fx.Node, fx.Node] = {}
        for index in sorted(specs):
            out, shortcut = ports[PORT_OUTPUT][index], ports[PORT_SHORTCUT][index]
            with graph.inserting_before(out.next):
                mix = add(f"{GATE_ROOT}.skip.{index}", (out, replaced.get(shortcut, shortcut), masks[index]), SKIP_MIX, specs[index], SkipMix(table.skip_index))
            out.replace_all_uses_with(mix, delete_user_cb=lambda user: user is not mix)
            replaced[out] = mix
    return rebuild(gm, graph, modules)


def _mix_quantizers(gm: fx.GraphModule, graph: fx.Graph, table: CandidateTable, masks, modules) -> None:
    """Rewire every quantizer of a gated op to take its block's mask (see the module docstring)."""
    by_target = {n.target: n for n in graph.nodes if n.op == "call_module"}
    for compute, spec, binding in gated_ops(graph):
        mask = masks[spec.index]
        for target in binding.act:
            node = by_target[target]
            node.args = (node.args[0], mask)
            modules[target] = MixedActQuant(table, attr(gm, target).momentum)
        grad_node = by_target[binding.grad]
        old = attr(gm, binding.grad)
        mixed = MixedGradQuant(table, old.stochastic)
        mixed.copy_output = old.copy_output
        mixed.set_extra_state(old.get_extra_state())
        modules[binding.grad] = mixed
        y = compute
        if table.fp32_index is not None and binding.weight is not None:
            y = _fp32_rows(graph, compute, by_target[binding.weight], mask, table.fp32_index, modules)
        grad_node.args = (y, mask)


def _fp32_rows(graph, compute: fx.Node, weight_node: fx.Node, mask, index: int, modules) -> fx.Node:
    if not compute.args or compute.op != "call_function":
        raise UnsupportedGraphError(f"op '{compute.name}' takes its input by keyword; the 'fp32' candidate needs it positional: remove 'fp32' from candidates")
    raw_weight = weight_node.args[0]
    swap = lambda a: raw_weight if a is weight_node else a
    args = tuple(swap(a) for a in compute.args)
    kwargs = {k: swap(v) for k, v in compute.kwargs.items()}
    target = f"{GATE_ROOT}.fp32.{compute.name}"  # node names are unique identifiers
    modules[target] = FP32Rows(compute.target, index)
    with graph.inserting_before(compute.next):
        node = graph.call_module(target, (compute, mask) + args, kwargs)
    set_inserted(node, Inserted(role=FP32_ROWS, serves=compute.name))
    return node
