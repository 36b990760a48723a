"""pfq: progressive fractional quantization (docs/method.md section 2).

Forward and gradient bits follow --num-bits-schedule / --num-grad-bits-schedule, one stage at a
time; the PFQ plateau indicator (fracfx.runtime.PFQScheduler) moves to the next stage.
"""

from __future__ import annotations

from fracfx.errors import ConfigError
from fracfx.train.config import Option
from fracfx.train.methods import Method, register_method
from fracfx.train.methods.shared import PLATEAU_OPTIONS, check_schedule, plateau_settings, quantized
from fracfx.train.recipe import MethodStatus, Recipe


@register_method
class PFQMethod(Method):
    name = "pfq"
    help = "progressive fractional quantization: --num-bits-schedule / --num-grad-bits-schedule, raised on loss plateaus"
    options = (
        Option("num_bits_schedule", int, (3, 4, 6, 8), "forward (activation and weight) bits per stage", nargs="+", check=check_schedule),
        Option("num_grad_bits_schedule", int, (6, 6, 8, 8), "gradient bits per stage", nargs="+", check=check_schedule),
    ) + PLATEAU_OPTIONS

    @classmethod
    def check_options(cls, values):
        fw, bw = values["num_bits_schedule"], values["num_grad_bits_schedule"]
        if len(fw) != len(bw):
            raise ConfigError(f"num_bits_schedule {fw} and num_grad_bits_schedule {bw} must have one entry per stage each")

    def build(self, model, example_input, context):
        from fracfx.runtime import CostMeter, PFQScheduler

        fw, bw = context.option("num_bits_schedule"), context.option("num_grad_bits_schedule")
        gm = quantized(model, example_input, context, fw[0], fw[0], bw[0])
        scheduler = PFQScheduler(gm, fw, bw, **plateau_settings(context))

        def status() -> MethodStatus:
            extra = {"threshold": scheduler.threshold, "last_max_difference": scheduler.tracker.indicator.last_max_difference}
            return MethodStatus(*scheduler.bits, scheduler.stage, tuple(i for i, _ in scheduler.turning_points), extra)

        return Recipe(model=gm, meter=CostMeter(gm), status=status, schedulers={"scheduler": scheduler},
                      synchronize=(scheduler.tracker.sync,))
