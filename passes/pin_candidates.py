"""pin_candidates: a DFQ GraphModule -> a static one, each gated block fixed at one candidate.

    pinned = pin_candidates(qm, choices={0: 2, 1: 2, 2: 4, ...})   # block index -> candidate index

Per gated block i pinned at candidate k of the CandidateTable:

    MixedActQuant(x, m_i)   -> ActQuant(x) at a_k      (running range and momentum carried over)
    MixedGradQuant(y, m_i)  -> GradQuant(y) at g_k     (rounding generator state carried over)
    FP32Rows(y, m_i, ...)   -> y                       (k = "fp32": the op's quantizers go to 0 bits instead,
                                                        its weight quantizer included)
    SkipMix(out, sc, m_i)   -> sc if k is "skip" else out   (a skipped block's body becomes dead code;
                                                        a projection shortcut stays, as in DFQ: FP32
                                                        input, weight at its own bits)

after which the gate subgraph feeds nothing and is removed. The result is an ordinary statically
quantized model: cost_report, set_bits, freeze and export_onnx work on it as on any
QuantConfig model, and in eval mode it computes exactly what the DFQ model computes for a
sample whose gates all choose the pinned candidates (same running ranges, same weights).
The input is not modified; unchanged submodules are shared with it (as in every pass).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.fx as fx
from torch import nn

from fracfx.config import FP32_CANDIDATE, SKIP
from fracfx.errors import ConfigError, PassError
from fracfx.meta import BLOCK, FP32_ROWS, GATE_ROLES, INSERTED, QUANT_BINDING, SKIP_MIX, get_block, get_inserted
from fracfx.nn.gates import CandidateTable
from fracfx.nn.mixed import MixedActQuant, MixedGradQuant
from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant
from fracfx.passes.infra import attr, copy_graph, gated_ops, graph_pass, rebuild, remove_dead_nodes
from fracfx.passes.infra import gate_choices  # noqa: F401  (importable here for the trainer; it lives in infra)


def _bits(entry) -> tuple[int, int]:
    """(act, grad) bits of a candidate entry; FP32 and skip run unquantized (0)."""
    return (0, 0) if isinstance(entry, str) else (entry[0], entry[1])


def _act(old: MixedActQuant, bits: int) -> ActQuant:
    new = ActQuant(bits, old.momentum)
    with torch.no_grad():
        new.running_lo.copy_(old.running_lo)
        new.running_range.copy_(old.running_range)
    return new.train(old.training)


def _grad(old: MixedGradQuant, bits: int) -> GradQuant:
    new = GradQuant(bits, old.stochastic, copy_output=old.copy_output)
    new.set_extra_state(old.get_extra_state())
    return new.train(old.training)


@graph_pass(reads=(BLOCK, QUANT_BINDING, INSERTED))
def pin_candidates(gm: fx.GraphModule, /, *, choices: Mapping[int, int]) -> fx.GraphModule:
    """Return a static copy of a DFQ model with block i fixed at candidate choices[i] (module docstring)."""
    gates = gate_choices(gm)
    if not gates:
        raise ConfigError("pin_candidates needs a DFQ model (fracfx.transform(model, fracfx.DFQConfig(...), ...)); this one has no gates")
    missing = sorted(set(gates) - set(choices))
    extra = sorted(set(choices) - set(gates))
    if missing or extra:
        raise ConfigError(f"pin_candidates: choices must name every gated block index {sorted(gates)} once; missing {missing}, unknown {extra}")
    table: CandidateTable = next(iter(gates.values())).table
    for index, k in choices.items():
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(table):
            raise ConfigError(f"pin_candidates: block {index} -> {k!r} is not a candidate index 0..{len(table) - 1} of {table.labels}")
    entry = {index: table.entries[k] for index, k in choices.items()}

    graph, _ = copy_graph(gm)
    modules: dict[str, nn.Module] = {}
    by_target = {n.target: n for n in graph.nodes if n.op == "call_module"}
    for node, spec, binding in gated_ops(graph):
        chosen = entry[spec.index]
        act_bits, grad_bits = _bits(chosen)
        for target in binding.act:
            quant = by_target[target]
            modules[target] = _act(attr(gm, target), act_bits)
            quant.args = (quant.args[0],)
        grad_node = by_target[binding.grad]
        modules[binding.grad] = _grad(attr(gm, binding.grad), grad_bits)
        grad_node.args = (grad_node.args[0],)
        if chosen == FP32_CANDIDATE and binding.weight is not None:
            old: WeightQuant = attr(gm, binding.weight)
            modules[binding.weight] = WeightQuant(0, old.axis, old.integer_zero_point)
    for node in list(graph.nodes):
        inserted = get_inserted(node)
        role = inserted.role if inserted is not None else None
        if role == FP32_ROWS:
            node.replace_all_uses_with(node.args[0])
        elif role == SKIP_MIX:
            out, shortcut, mask = node.args
            node.replace_all_uses_with(shortcut if entry[get_block(mask).index] == SKIP else out)
        else:
            continue
        graph.erase_node(node)
    remove_dead_nodes(graph)  # the gate subgraph, skipped block bodies
    for node in graph.nodes:
        inserted = get_inserted(node)
        if inserted is not None and inserted.role in GATE_ROLES:
            raise PassError(f"pin_candidates: gate node {node.name} ({inserted.role}) is still used after pinning every block")
    return rebuild(gm, graph, modules)
