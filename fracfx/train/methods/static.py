"""static: fixed activation, weight and gradient bits for the whole run (default 8/8/8)."""

from __future__ import annotations

from fracfx.bits import cost_bits
from fracfx.train.methods import Method, register_method
from fracfx.train.methods.shared import bit_options, quantized
from fracfx.train.recipe import MethodStatus, Recipe


@register_method
class StaticMethod(Method):
    name = "static"
    help = "fixed --act-bits/--weight-bits/--grad-bits for the whole run (default 8/8/8)"
    options = bit_options()

    def build(self, model, example_input, context):
        from fracfx.runtime import CostMeter

        bits = [context.option(name) for name in ("act_bits", "weight_bits", "grad_bits")]
        gm = quantized(model, example_input, context, *bits)
        status = MethodStatus(*(cost_bits(b) for b in bits))
        return Recipe(model=gm, meter=CostMeter(gm), status=lambda: status)
