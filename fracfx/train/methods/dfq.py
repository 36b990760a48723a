"""dfq: dynamic fractional quantization (docs/method.md section 3).

    fracfx train --method dfq --weight-bits 4 --target-ratio 3 --save-folder runs/dfq

fracfx.transform(model, DFQConfig(...)) puts a recurrent gate in front of every residual block;
each sample picks one (activation bits, gradient bits) candidate per block (weights at
--weight-bits, default 4). The loss is CE + DFQController.cost_loss(): a bang-bang term that
pushes cp (percent of FP32 training cost of the gated ops, per batch) towards --target-ratio.
Ops outside every gated block run at --act-bits/--grad-bits (default 8; with DFQConfig's
default keep_fp32, the first conv and the classifier stay FP32).

Accounting. The cost meter is runtime/dfq_cost.py's DFQCostMeter: every iteration adds what
each sample actually ran (its candidate in each block) plus the ungated ops at their static
bits. Each metrics line's method_state holds: cp (mean over the iterations since the last
evaluation), target (the set-point now) and window_target (its mean over those iterations),
cp_trace ([iteration, mean cp, mean target] per indicator window), stage_cp (per FracTrain
stage since the start: mean cp, set-point, iterations), usage (per block, per candidate: the
training samples since the last evaluation), eval_usage (the same over the test set of this
evaluation) and the cost split (gated, ungated, gate network); see runtime/dfq_usage.py.

Export. The recipe's export pins every gated block at its most used candidate: the choices
of the last evaluation on the test set (what the trained gates do), or the training usage when
no evaluation ran; see fracfx.passes.pin_candidates.
"""

from __future__ import annotations

from typing import Any

from fracfx.bits import cost_bits
from fracfx.config import FP32_CANDIDATE, SKIP, DFQConfig
from fracfx.errors import ConfigError
from fracfx.train.config import Option
from fracfx.train.methods import Method, register_method
from fracfx.train.methods.shared import bit_options, check_number, keep_fp32
from fracfx.train.recipe import BuildContext, MethodStatus, Recipe

DEFAULT_CANDIDATES = "3:6,4:6,4:8,6:8,6:12"


def parse_candidates(value) -> tuple:
    """"3:6,4:8,skip,fp32" (or a sequence of such entries / (a, g) pairs) -> DFQConfig candidates."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if isinstance(item, str):
            text = item.strip().lower()
            if text in (SKIP, FP32_CANDIDATE):
                out.append(text)
                continue
            parts = text.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ConfigError(f"--candidates entry {item!r} is not A:G (activation:gradient bits, e.g. 4:8), 'skip' or 'fp32'")
            out.append((int(parts[0]), int(parts[1])))
        else:
            out.append(item)
    return DFQConfig(candidates=tuple(out)).candidates  # validates, canonical form


def format_candidates(candidates) -> str:
    return ",".join(c if isinstance(c, str) else f"{c[0]}:{c[1]}" for c in candidates)


def _check_candidates(value, name: str) -> str:
    return format_candidates(parse_candidates(value))


def _check_ratio(value, name: str) -> float:
    return float(check_number(value, name))


def dfq_options(target_ratio: float, target_help: str) -> tuple[Option, ...]:
    """The options of a DFQ-steered method; FracTrain starts from a lower set-point."""
    return (
        Option("target_ratio", float, target_ratio, target_help, check=_check_ratio),
        Option("beta", float, 1e-3, "strength of the DFQ cost term (docs/method.md section 3)", check=_check_ratio),
        Option("candidates", str, DEFAULT_CANDIDATES, "gate candidates: comma-separated A:G bit pairs, 'skip', 'fp32'", check=_check_candidates),
        Option("relax", float, 0.0, "cp band around the set-point where the cost term's sign is 0", check=_check_ratio),
        Option("error_gain", float, 0.0, "scale the cost term's sign by 1 + error_gain * |cp - set-point| (cp in %): the gates "
               "follow a raised set-point faster; 0 = the paper's rule", check=_check_ratio),
        Option("raise_gain", float, 0.0, "below the set-point only, scale the cost term's sign by 1 + raise_gain * (set-point - cp): "
               "the gates follow a raised set-point faster, an unreachable low one pushes as in the paper; 0 = the paper's rule",
               check=_check_ratio),
    ) + bit_options("ungated ops' ", weight_default=4)


def dfq_recipe(model, example_input, context: BuildContext, *, scheduler=None) -> Recipe:
    """The DFQ recipe. scheduler: None, or controller -> FracTrainScheduler (fractrain.py): it is
    stepped after the usage statistics, and its stage and turning points enter the status."""
    from fracfx.api import transform
    from fracfx.nn.precision import seed_rounding
    from fracfx.runtime import DFQController
    from fracfx.runtime.dfq_cost import DFQCostMeter
    from fracfx.runtime.dfq_usage import DFQUsage

    c = context.config
    config = DFQConfig(weight_bits=context.option("weight_bits"), candidates=parse_candidates(context.option("candidates")),
                       ungated_act_bits=context.option("act_bits"), ungated_grad_bits=context.option("grad_bits"),
                       stochastic_grad=c.stochastic_grad, **keep_fp32(context))
    gm = transform(model, config, example_inputs=example_input)
    seed_rounding(gm, c.seed)
    controller = DFQController(gm, target_ratio=context.option("target_ratio"), beta=context.option("beta"),
                               relax=context.option("relax"), reduce=context.ranks,
                               error_gain=context.option("error_gain"), raise_gain=context.option("raise_gain"))
    frac = None if scheduler is None else scheduler(controller)
    usage = DFQUsage(controller, window=context.plan.window, reduce=context.ranks, **({} if frac is None else {"stage": lambda: frac.stage}))
    meter = DFQCostMeter(gm, controller)
    schedulers: dict[str, Any] = {"tracking": usage}  # usage first: it records the set-point the step ran at
    if frac is not None:
        schedulers["scheduler"] = frac
    weight_bits = float(cost_bits(context.option("weight_bits")))

    def status() -> MethodStatus:
        a, w, g = usage.last_bits if usage.last_bits is not None else (0.0, weight_bits, 0.0)
        extra: dict[str, Any] = {
            "cp": usage.since_eval.cp(), "target": controller.target_ratio, "window_target": usage.since_eval.target(),
            "last_cp": controller.last_cp, "cp_trace": usage.cp_trace(), "stage_cp": usage.stage_cp(),
            "candidates": list(usage.labels), "usage": usage.named(usage.window_usage()),
            "eval_usage": usage.named(usage.evaluation_usage()),
        }
        summary = meter.summary()
        for key in ("gated_effective_macs", "ungated_effective_macs", "gate_effective_macs", "ratio_vs_sbm_with_gate"):
            extra[key] = summary[key]
        stage, points = None, ()
        if frac is not None:
            extra["threshold"] = frac.tracker.indicator.threshold
            extra["last_max_difference"] = frac.tracker.indicator.last_max_difference
            stage, points = frac.stage, tuple(i for i, _ in frac.tracker.turning_points)
        return MethodStatus(round(a, 3), round(w, 3), round(g, 3), stage, points, extra, setpoint=(extra["cp"], extra["target"]))

    def export():
        from fracfx.api import gate_choices, pin_candidates  # pinning runs through the pass runner

        pinned = usage.pinned_candidates()
        index_of = {id(module): index for index, module in gate_choices(gm).items()}
        choices = {index_of[id(block.choice)]: usage.labels.index(pinned[block.name]) for block in controller.blocks}
        return pin_candidates(gm, choices=choices)

    sync = (usage.sync,) if frac is None else (usage.sync, frac.tracker.sync)
    return Recipe(model=gm, meter=meter, status=status, loss_terms=(controller.cost_loss,), schedulers=schedulers,
                  state={"controller": controller}, synchronize=sync, after_evaluate=(usage.end_window,), export=export)


@register_method
class DFQMethod(Method):
    name = "dfq"
    help = "dynamic fractional quantization: per-sample, per-block precision gates steered to --target-ratio (cp %)"
    options = dfq_options(3.0, "cp set-point: percent of FP32 training cost of the gated ops")

    def build(self, model, example_input, context):
        return dfq_recipe(model, example_input, context)
