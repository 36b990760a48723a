"""fractrain: FracTrain = the DFQ recipe + a FracTrainScheduler (docs/method.md section 4).

    fracfx train --method fractrain --weight-bits 4 --target-ratio 1.5 --target-ratio-step 0.5 --save-folder runs/fractrain

The PFQ plateau indicator (--window, --initial-threshold, --decay, --num-turning-point, the
flags PFQ uses) raises DFQ's cp set-point by --target-ratio-step at each turning point.
"""

from __future__ import annotations

from fracfx.train.config import Option
from fracfx.train.methods import Method, register_method
from fracfx.train.methods.dfq import _check_ratio, dfq_options, dfq_recipe
from fracfx.train.methods.shared import PLATEAU_OPTIONS, plateau_settings


@register_method
class FracTrainMethod(Method):
    name = "fractrain"
    help = ("FracTrain: DFQ whose cp set-point starts at --target-ratio and rises by --target-ratio-step at each "
            "loss plateau (PFQ's indicator: --window, --initial-threshold, --decay, --num-turning-point)")
    options = (
        dfq_options(1.5, "initial cp set-point (percent of FP32 training cost of the gated ops)")
        + (Option("target_ratio_step", float, 0.5, "set-point increase at each turning point", check=_check_ratio),)
        + PLATEAU_OPTIONS
    )

    def build(self, model, example_input, context):
        from fracfx.runtime import FracTrainScheduler

        def scheduler(controller):
            return FracTrainScheduler(controller, target_ratio_step=context.option("target_ratio_step"), **plateau_settings(context))

        return dfq_recipe(model, example_input, context, scheduler=scheduler)
