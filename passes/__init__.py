"""Pure graph passes: GraphModule in, new GraphModule out; the input is never mutated."""

from fracfx.passes.annotate_blocks import annotate_blocks
from fracfx.passes.annotate_cost import annotate_cost
from fracfx.passes.annotate_quant import annotate_quant
from fracfx.passes.capture import capture_graph
from fracfx.passes.insert_gates import insert_gates
from fracfx.passes.insert_quant import insert_quant
from fracfx.passes.pin_candidates import pin_candidates
from fracfx.passes.infra import run_pipeline
from fracfx.passes.replace_attention import replace_attention

__all__ = [
    "capture_graph", "replace_attention", "annotate_quant", "annotate_blocks", "annotate_cost",
    "insert_quant", "insert_gates", "pin_candidates", "run_pipeline",
]
