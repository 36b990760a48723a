"""freeze_precision: a trained transformed GraphModule -> one fixed-precision, eval-only model.

    ActQuant(x)               -> FrozenActQuant(x)   running range, integer zero point
    WeightQuant(get_attr W)   -> FrozenWeight()      pre-quantized integer codes per channel
    GradQuant(y)              -> y                   removed: a frozen model has no backward
    FusedAttention(y, ...)    -> y                   a lowered SDPA keeps its decomposition (ONNX has no fused kernel)

The result is exactly what the exported ONNX computes (see fracfx.nn.frozen): activations use the
running ranges (eval semantics), the grid offset lo is moved onto an integer zero point
(fracfx.nn.frozen.integer_grid), weights are quantized once from the FP32 master weights.

Inserted nodes are dispatched on their Inserted.role (`_freezer`). Nodes that are no longer used
afterwards (a DFQ gate subgraph whose masks fed only quantizers) are removed as dead code; an
inserted node of a role without a freezer that is still used is an ExportError naming it.
bits=(a, w) overrides every quantizer, which
is how a DFQ model (per-sample bits) is frozen at one precision: its mixed quantizers freeze
at those bits, the "fp32"/"skip" candidate nodes are stripped, and the gate subgraph, now unused,
is removed.

The output shares nothing with the input: it is a deep copy, in eval mode, without gradients.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from fracfx import meta
from fracfx.bits import FP32, check_bits
from fracfx.errors import ExportError, FracfxError
from fracfx.meta import FROZEN, INSERTED, FrozenQuant, get_inserted
from fracfx.meta import is_frozen  # noqa: F401  (importable here for callers not yet moved; it lives in meta)
from fracfx.nn.frozen import FrozenActQuant, FrozenWeight, integer_grid, quantize_codes
from fracfx.nn.quant import channel_range, qmax_of, scale_of
from fracfx.nn.quantizers import QUANTIZER_TYPES
from fracfx.passes.infra import attr, copy_graph, graph_pass, rebuild, remove_dead_nodes


@dataclasses.dataclass
class _Freezing:
    """What a freezer may read (gm, bits) and write (modules, records)."""

    gm: fx.GraphModule
    graph: fx.Graph
    bits: tuple[int, int] | None
    modules: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    records: list[FrozenQuant] = dataclasses.field(default_factory=list)

    def bits_for(self, node: fx.Node, module: nn.Module, index: int) -> int:
        if self.bits is not None:
            return self.bits[index]
        try:
            return module.current_bits
        except (AttributeError, FracfxError) as error:
            raise ExportError(
                f"node {node.name} ({node.target}, {type(module).__name__}) has no single bit width "
                "(per-sample bits?); freeze it at one precision with freeze(gm, bits=(act_bits, weight_bits))"
            ) from error

    def replace_with(self, node: fx.Node, module: nn.Module, args: tuple) -> fx.Node:
        self.modules[node.target] = module
        with self.graph.inserting_before(node):
            new = self.graph.call_module(node.target, args)
        new.meta.update(node.meta)
        return new

    def grid(self, node: fx.Node, role: str, bits: int, lo, rng):
        """(scale, zero_point) of the integer grid for a range, recorded as a FrozenQuant."""
        scale, zero_point, extended = integer_grid(lo, rng, bits)
        self._record(node, role, bits, lo, rng, scale, zero_point, extended)
        return scale, zero_point

    def _record(self, node: fx.Node, role: str, bits: int, lo, rng, scale, zero_point, extended) -> None:
        shift = (-zero_point.float() * scale - lo.float()).abs() / scale
        kept = shift[~extended] if bool(extended.any()) else shift
        growth = (scale / scale_of(rng.float(), qmax_of(bits))).max().item()
        serves = getattr(get_inserted(node), "serves", "")
        self.records.append(FrozenQuant(
            str(node.target), role, serves, bits, max_shift_steps=kept.max().item() if kept.numel() else 0.0,
            extended=int(extended.sum()), max_step_growth=growth,
        ))


def _freeze_act(ctx: _Freezing, node: fx.Node):
    module = attr(ctx.gm, node.target)
    bits, x = ctx.bits_for(node, module, 0), node.args[0]
    if bits == FP32:
        return x
    lo, rng = getattr(module, "running_lo", None), getattr(module, "running_range", None)
    if lo is None or rng is None:
        raise ExportError(f"node {node.name} ({type(module).__name__}) keeps no running range; it cannot be frozen")
    if not (torch.isfinite(lo) and torch.isfinite(rng)) or rng < 0:
        raise ExportError(f"node {node.name} ({node.target}) has a broken running range (lo={lo.item()}, range={rng.item()}); recalibrate it")
    if rng == 0 and lo == 0:
        raise ExportError(
            f"node {node.name} ({node.target}) has no activation range: it never ran in training mode. "
            "Train the model, or calibrate it first with fracfx.export.calibrate(gm, batches)"
        )
    scale, zero_point = ctx.grid(node, meta.ACT_QUANT, bits, lo, rng)
    return ctx.replace_with(node, FrozenActQuant(bits, scale, zero_point), (x,))


def _freeze_weight(ctx: _Freezing, node: fx.Node):
    module = attr(ctx.gm, node.target)
    bits, source = ctx.bits_for(node, module, 1), node.args[0]
    if bits == FP32:
        return source
    weight = _constant_value(ctx.gm, source) if isinstance(source, fx.Node) else None
    if weight is None:
        raise ExportError(
            f"node {node.name} quantizes a weight computed in the graph from the model's inputs ({source}), not from "
            "parameters; freeze needs a constant weight: compute it once into an nn.Parameter before transform()"
        )
    weight = weight.detach()
    axis = getattr(module, "axis", 0)
    lo, rng = channel_range(weight, axis)
    scale, zero_point = ctx.grid(node, meta.WEIGHT_QUANT, bits, lo, rng)
    codes = quantize_codes(weight.float(), scale, zero_point, bits)
    return ctx.replace_with(node, FrozenWeight(bits, codes, scale, zero_point, axis), ())


PURE_OPS = ("call_function", "call_method", "get_attr")


def _constant_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The value of `node` if it is computed from parameters and buffers alone (a get_attr, or e.g.
    the query slice of nn.MultiheadAttention's packed in_proj_weight, or a tied head's transpose);
    None when an input or a module call feeds it. Evaluated once, in graph order."""
    needed: list[fx.Node] = []
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op not in PURE_OPS:
            return None
        needed.append(current)
        pending.extend(current.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    values: dict[fx.Node, object] = {}
    with torch.no_grad():
        for current in sorted(needed, key=order.__getitem__):
            args, kwargs = fx.node.map_arg((current.args, current.kwargs), values.__getitem__)
            if current.op == "get_attr":
                values[current] = attr(gm, current.target)
            elif current.op == "call_method":
                values[current] = getattr(args[0], current.target)(*args[1:], **kwargs)
            else:
                values[current] = current.target(*args, **kwargs)
    value = values[node]
    return value if isinstance(value, torch.Tensor) else None


def _strip(ctx: _Freezing, node: fx.Node):
    return node.args[0]


def _freezer(role: str) -> Callable[[_Freezing, fx.Node], object] | None:
    """What freezing does to an inserted node of `role` (None: nothing, it must be dead after)."""
    match role:
        case meta.ACT_QUANT:  # ActQuant, and DFQ's MixedActQuant(x, mask) at explicit bits
            return _freeze_act
        case meta.WEIGHT_QUANT:
            return _freeze_weight
        case meta.GRAD_QUANT | meta.FP32_ROWS | meta.SKIP_MIX:
            # no backward; at one fixed precision no sample takes DFQ's "fp32" or "skip" candidate
            return _strip
        case meta.FUSED_ATTENTION:
            # the decomposition (its first input): what the exported ONNX computes, at any bits
            return _strip
    return None


@graph_pass(reads=(INSERTED,), writes=(FROZEN,))
def freeze_precision(gm: fx.GraphModule, /, *, bits: tuple[int | None, int | None] | None = None) -> fx.GraphModule:
    """Return a fixed-precision, eval-only copy of a transformed GraphModule (module docstring)."""
    if bits is not None:
        if len(tuple(bits)) != 2:
            raise ExportError(f"bits must be (act_bits, weight_bits), got {bits!r}")
        bits = (check_bits(bits[0], "act bits"), check_bits(bits[1], "weight bits"))
    graph, _ = copy_graph(gm)
    ctx = _Freezing(gm, graph, bits)
    for node in list(graph.nodes):
        inserted = get_inserted(node)
        freezer = _freezer(inserted.role) if inserted is not None else None
        if freezer is None:
            continue
        node.replace_all_uses_with(freezer(ctx, node))
        graph.erase_node(node)
    remove_dead_nodes(graph)
    for node in graph.nodes:
        inserted = get_inserted(node)
        if inserted is not None and _freezer(inserted.role) is None:
            raise ExportError(
                f"node {node.name} (role {inserted.role!r}) has no freezer and is still used; freeze at one "
                "precision with bits=(a, w), or make it unused before freezing"
            )
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), QUANTIZER_TYPES) and node.target not in ctx.modules:
            raise ExportError(f"node {node.name} ({node.target}) is a quantizer without fracfx meta; transform the model with fracfx.transform")
    out = copy.deepcopy(rebuild(gm, graph, ctx.modules))
    out.meta[FROZEN] = tuple(ctx.records)
    out.eval()
    out.requires_grad_(False)
    return out
