"""insert_markers: a frozen GraphModule -> the same graph with ONNX marker modules for its quantizers.

Each FrozenActQuant / FrozenWeight call becomes a module whose autograd Function exports
(TorchScript exporter, `symbolic`) as one node of the private domain "fracfx" keyed by the
quantizer's submodule path; nothing of torch's fake-quant symbolics is used. In PyTorch an
activation marker is the identity and a weight marker returns the dequantized weight: values only
matter for tracing (an fx graph has no data-dependent control flow). fracfx.export.onnx_model exports the view with torch.onnx and lowers the markers to
QuantizeLinear / DequantizeLinear (fracfx.export.qdq).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fracfx.errors import ExportError
from fracfx.meta import FROZEN
from fracfx.nn.frozen import FrozenActQuant, FrozenWeight
from fracfx.passes.infra import copy_graph, frozen_quantizers, graph_pass, rebuild

DOMAIN = "fracfx"
ACT_OP = "Act"
WEIGHT_OP = "Weight"


class _Mark(torch.autograd.Function):
    """Identity while tracing (an fx graph has no data-dependent control flow, so values do not
    matter); exports as fracfx::<op>(value) {key}."""

    @staticmethod
    def forward(ctx, value, op, key):
        return value.clone()

    @staticmethod
    def symbolic(g, value, op, key):
        return g.op(f"{DOMAIN}::{op}", value, key_s=key).setType(value.type())


class _ActMarker(nn.Module):
    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def forward(self, x):
        return _Mark.apply(x, ACT_OP, self.key)


class _WeightMarker(nn.Module):
    def __init__(self, frozen: FrozenWeight, key: str):
        super().__init__()
        self.key = key
        self.register_buffer("value", frozen())

    def forward(self):
        return _Mark.apply(self.value, WEIGHT_OP, self.key)


@graph_pass(reads=(FROZEN,))
def insert_markers(frozen: fx.GraphModule, /) -> fx.GraphModule:
    """The frozen graph with its quantizers replaced by ONNX markers (same graph), in eval mode."""
    if FROZEN not in frozen.meta:
        raise ExportError("insert_markers needs the output of freeze_precision / fracfx.freeze; freeze the model first")
    markers = {}
    for key, module in frozen_quantizers(frozen).items():
        markers[key] = _ActMarker(key) if isinstance(module, FrozenActQuant) else _WeightMarker(module, key)
    graph, _ = copy_graph(frozen)
    out = rebuild(frozen, graph, markers)
    for module in markers.values():
        module.training = False
    out.training = False
    return out
