"""fp32: plain FP32 training of the float model, untransformed; costs counted as FP32."""

from __future__ import annotations

from fracfx.train.methods import Method, register_method
from fracfx.train.methods.shared import fp32_graph
from fracfx.train.recipe import MethodStatus, Recipe


@register_method
class FP32Method(Method):
    name = "fp32"
    help = "plain FP32 training (the float model, untransformed)"

    def build(self, model, example_input, context):
        from fracfx.runtime import CostMeter

        return Recipe(model=model, meter=CostMeter(fp32_graph(model, example_input)), status=lambda: MethodStatus(32, 32, 32))
