"""Pure graph passes: GraphModule in, new GraphModule out; the input is never mutated.

Each pass is declared with fracfx.passes.infra.graph_pass (the node.meta keys it reads and
writes, `pass.contract`); PASSES lists them all in pipeline order, and run_pipeline runs a
straight list of steps over them, checking each contract.
"""

from fracfx.passes.annotate_blocks import annotate_blocks
from fracfx.passes.annotate_cost import annotate_cost
from fracfx.passes.annotate_quant import annotate_quant
from fracfx.passes.capture import capture_graph
from fracfx.passes.freeze_precision import freeze_precision
from fracfx.passes.infra import run_pipeline, step
from fracfx.passes.insert_gates import insert_gates
from fracfx.passes.insert_markers import insert_markers
from fracfx.passes.insert_quant import insert_quant
from fracfx.passes.lower_aten import lower_aten
from fracfx.passes.integer_arithmetic import integer_arithmetic
from fracfx.passes.pin_candidates import pin_candidates
from fracfx.passes.propagate_shapes import propagate_shapes
from fracfx.passes.replace_attention import replace_attention

PASSES = (
    capture_graph, lower_aten, replace_attention, annotate_quant, propagate_shapes, annotate_blocks, annotate_cost, insert_quant,
    insert_gates, pin_candidates, freeze_precision, integer_arithmetic, insert_markers,
)

__all__ = [p.__name__ for p in PASSES] + ["PASSES", "run_pipeline", "step"]
