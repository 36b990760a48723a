"""insert_markers: frozen quantizers -> ONNX markers; same graph, activation markers the identity,
weight markers the dequantized weights."""

import pytest
import torch

import fracfx
from fracfx.errors import ExportError
from fracfx.export import calibrate
from fracfx.nn.frozen import FROZEN_TYPES
from fracfx.passes.freeze_precision import freeze_precision
from fracfx.passes.insert_markers import insert_markers
from tests.passes.conftest import EXAMPLE, ConvNet


def test_every_frozen_quantizer_becomes_a_marker_with_the_same_values():
    gm = fracfx.transform(ConvNet(), fracfx.QuantConfig(keep_fp32=()), example_inputs=EXAMPLE)
    frozen = freeze_precision(calibrate(gm, [torch.randn(8, 3, 6, 6)]))
    quantizers = [n.target for n in frozen.graph.nodes if n.op == "call_module" and isinstance(frozen.get_submodule(n.target), FROZEN_TYPES)]
    out = insert_markers(frozen)
    assert len(quantizers) == 6 and not any(isinstance(m, FROZEN_TYPES) for m in out.modules())
    assert [type(out.get_submodule(t)).__name__ for t in quantizers].count("_ActMarker") == 4
    assert len(out.graph.nodes) == len(frozen.graph.nodes) and not out.training
    x = torch.randn(2, 3, 6, 6)
    for target in quantizers:
        marker, quantizer = out.get_submodule(target), frozen.get_submodule(target)
        if type(marker).__name__ == "_ActMarker":
            assert torch.equal(marker(x), x)
        else:
            assert torch.equal(marker(), quantizer())


def test_needs_a_frozen_model():
    with pytest.raises(ExportError, match="freeze"):
        insert_markers(fracfx.transform(ConvNet()))
