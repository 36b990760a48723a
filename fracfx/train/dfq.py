"""DFQ and FracTrain recipes for `fracfx train` (FRACTRAIN.md sections 3 and 4).

    fracfx train --method dfq --weight_bits 4 --target_ratio 3 --save_folder runs/dfq
    fracfx train --method fractrain --weight_bits 4 --target_ratio 1.5 --target_ratio_step 0.5 --save_folder runs/fractrain

dfq: fracfx.transform(model, DFQConfig(...)) puts a recurrent gate in front of every residual
block; each sample picks one (activation bits, gradient bits) candidate per block (weights at
--weight_bits, default 4). The loss is CE + DFQController.cost_loss(): a bang-bang term that
pushes cp (percent of FP32 training cost of the gated ops, per batch) towards --target_ratio.
fractrain: the same, with the PFQ plateau indicator (--window, --initial_threshold, --decay,
--num_turning_point, the flags PFQ uses) raising the set-point by --target_ratio_step at each
turning point (FracTrainScheduler).

Options: --target_ratio (cp set-point in %; dfq 3.0, fractrain 1.5), --target_ratio_step
(fractrain, 0.5), --beta (1e-3), --candidates (comma-separated A:G pairs, plus "skip" and
"fp32"; default 3:6,4:6,4:8,6:8,6:12), --relax (half-width of a band around the set-point
where the cost term's sign is 0; default 0). Ops outside every gated block run at the static
--act_bits/--grad_bits (default 8; with DFQConfig's default keep_fp32, the first conv and the
classifier stay FP32).

Accounting. The cost meter is runtime/dfq_cost.py's DFQCostMeter: every iteration adds what
each sample actually ran (its candidate in each block) plus the ungated ops at their static
bits. Each metrics line's method_state holds: cp (mean over the iterations since the last
evaluation), target (the set-point now) and window_target (its mean over those iterations),
cp_trace ([iteration, mean cp, mean target] per indicator window), stage_cp (per FracTrain
stage since the start: mean cp, set-point, iterations), usage (per block, per candidate: the
training samples since the last evaluation), eval_usage (the same over the test set of this
evaluation) and the cost split (gated, ungated, gate network).

Export. Method.export_model() pins every gated block at its most used candidate: the choices of
the last evaluation on the test set (what the trained gates do), or the training usage when no
evaluation ran; see fracfx.passes.pin_candidates.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch

from fracfx.bits import cost_bits
from fracfx.config import FP32_CANDIDATE, SKIP, DFQConfig
from fracfx.errors import ConfigError
from fracfx.nn.gates import choice_of
from fracfx.train import Method, Option, Precision, register_method

DEFAULT_CANDIDATES = "3:6,4:6,4:8,6:8,6:12"
TRACKING_KEYS = ("iteration", "window", "chunk", "trace", "stages", "usage_start", "eval_usage", "last_eval_usage", "last_bits")


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


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"--{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _fresh_mean() -> dict[str, float | int]:
    return {"iterations": 0, "cp_sum": 0.0, "target_sum": 0.0}


@dataclasses.dataclass(frozen=True)
class DFQPrecision(Precision):
    """Precision of a DFQ step: mean bits over the gated ops, plus cp against its set-point in the label."""

    @property
    def label(self) -> str:
        cp, target = self.extra.get("cp"), self.extra.get("target")
        stage = "" if self.stage is None else f"stage {self.stage} "
        steer = "" if cp is None else f"cp {cp:.2f}% (set-point {target:g}) "
        return f"{stage}{steer}A{self.act:g}/W{self.weight:g}/G{self.grad:g}"


_COMMON_OPTIONS = (
    Option("beta", float, 1e-3, "strength of the DFQ cost term (FRACTRAIN.md section 3)"),
    Option("candidates", str, DEFAULT_CANDIDATES, "gate candidates: comma-separated A:G bit pairs, 'skip', 'fp32'"),
    Option("relax", float, 0.0, "cp band around the set-point where the cost term's sign is 0"),
)


@register_method
class DFQMethod(Method):
    name = "dfq"
    help = "dynamic fractional quantization: per-sample, per-block precision gates steered to --target_ratio (cp %)"
    options = (Option("target_ratio", float, 3.0, "cp set-point: percent of FP32 training cost of the gated ops"),) + _COMMON_OPTIONS
    field_defaults = {"weight_bits": 4}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        values = super().check_options(options)
        for name in ("target_ratio", "target_ratio_step", "beta", "relax"):
            if name in values:
                values[name] = _number(values[name], name)
        values["candidates"] = format_candidates(parse_candidates(values["candidates"]))
        return values

    # -- building ---------------------------------------------------------------------------

    def dfq_config(self) -> DFQConfig:
        c = self.config
        kwargs = {} if c.keep_fp32 is None else {"keep_fp32": c.keep_fp32}
        return DFQConfig(
            weight_bits=c.weight_bits, candidates=parse_candidates(self.option("candidates")),
            ungated_act_bits=c.act_bits, ungated_grad_bits=c.grad_bits, stochastic_grad=c.stochastic_grad, **kwargs,
        )

    def make_scheduler(self):
        return None

    def build(self, model, example_input):
        from fracfx.api import seed_rounding, transform
        from fracfx.runtime import DFQController

        self.model = transform(model, self.dfq_config(), example_inputs=example_input)
        seed_rounding(self.model, self.config.seed)
        self.controller = DFQController(
            self.model, target_ratio=self.option("target_ratio"), beta=self.option("beta"), relax=self.option("relax"),
            reduce=self.ranks,
        )
        self.scheduler = self.make_scheduler()
        self.cost_model = self.model
        self.meter = None
        self.labels = tuple(self.controller.labels)
        self._bit_sums = [self._block_bit_sums(block) for block in self.controller.blocks]
        self.track = self._fresh_tracking()
        for block in self.controller.blocks:
            block.choice.register_forward_hook(self._eval_counter(block.name))
        return self.model

    def _block_bit_sums(self, block) -> list[tuple[float, float, float]]:
        """Per candidate: sum over the block's ops of MACs * (a, w, g) bits, as the cost model counts them."""
        table, sums = block.choice.table, []
        for entry in table.entries:
            a_sum = w_sum = g_sum = 0.0
            for macs, weight in block.ops:
                if entry == SKIP:
                    a, w, g = 0, 0, 0
                elif entry == FP32_CANDIDATE:
                    a = w = g = 32
                else:
                    a, g = cost_bits(entry[0]), cost_bits(entry[1])
                    w = a if weight is None else cost_bits(weight.current_bits)
                a_sum, w_sum, g_sum = a_sum + macs * a, w_sum + macs * w, g_sum + macs * g
            sums.append((a_sum, w_sum, g_sum))
        return sums

    def _fresh_tracking(self) -> dict[str, Any]:
        zeros = {b.name: [0] * len(self.labels) for b in self.controller.blocks}
        return {
            "iteration": 0, "window": _fresh_mean(), "chunk": _fresh_mean(), "trace": [], "stages": {},
            "usage_start": copy.deepcopy(zeros), "eval_usage": copy.deepcopy(zeros), "last_eval_usage": None, "last_bits": None,
        }

    def _eval_counter(self, name: str):
        """A forward hook on one gate's GateChoice: counts the choices made in eval mode (evaluations)."""

        def hook(module, inputs, mask):
            if not module.training:
                counts = torch.bincount(choice_of(mask), minlength=len(self.labels)).tolist()
                row = self.track["eval_usage"][name]
                self.track["eval_usage"][name] = [a + b for a, b in zip(row, counts)]

        return hook

    def cost_meter(self):
        from fracfx.runtime.dfq_cost import DFQCostMeter

        self.meter = DFQCostMeter(self.model, self.controller)
        return self.meter

    # -- per iteration ----------------------------------------------------------------------

    @property
    def stage(self) -> int:
        return 0 if self.scheduler is None else self.scheduler.stage

    def loss(self, outputs, targets, ce):
        target, stage = self.controller.target_ratio, self.stage
        cost = self.controller.cost_loss()
        cp = self.controller.last_cp
        t = self.track
        t["iteration"] += 1
        for acc in (t["window"], t["chunk"]):
            acc["iterations"] += 1
            acc["cp_sum"] += cp
            acc["target_sum"] += target
        record = t["stages"].setdefault(str(stage), {"iterations": 0, "cp_sum": 0.0, "target": target})
        record["iterations"] += 1
        record["cp_sum"] += cp
        if t["chunk"]["iterations"] >= self.plan.window:
            self._close_chunk()
        t["last_bits"] = self._batch_bits()
        return ce + cost

    def _close_chunk(self) -> None:
        t = self.track
        chunk = t["chunk"]
        if chunk["iterations"]:
            t["trace"].append([t["iteration"], chunk["cp_sum"] / chunk["iterations"], chunk["target_sum"] / chunk["iterations"]])
        t["chunk"] = _fresh_mean()

    def _batch_bits(self) -> list[float]:
        """MAC-weighted mean (a, w, g) over the gated ops and the samples of the last forward (data-parallel: the global batch)."""
        total = [0.0, 0.0, 0.0]
        batch = 0
        global_counts = self.controller.last_counts if self.ranks is not None else None
        for index, (block, sums) in enumerate(zip(self.controller.blocks, self._bit_sums)):
            if global_counts is None:
                choice = block.choice.last_choice
                batch, counts = len(choice), torch.bincount(choice, minlength=len(self.labels)).tolist()
            else:
                counts = global_counts[index]
                batch = sum(counts)
            for k, n in enumerate(counts):
                if n:
                    total = [s + n * v for s, v in zip(total, sums[k])]
        denominator = batch * self.controller.total_macs
        return [s / denominator for s in total]

    def after_step(self, loss: float) -> None:
        if self.scheduler is not None:
            self.scheduler.step(loss)

    def synchronize(self) -> None:
        """The evaluation's gate choices summed over the ranks' test shards; FracTrain's open window over ranks."""
        names = list(self.track["eval_usage"])
        flat = [n for name in names for n in self.track["eval_usage"][name]]
        total = [round(n) for n in self.ranks.sum(flat)]
        k = len(self.labels)
        self.track["eval_usage"] = {name: total[i * k:(i + 1) * k] for i, name in enumerate(names)}
        if self.scheduler is not None:
            self.scheduler.tracker.sync()

    def after_evaluate(self) -> None:
        t = self.track
        t["usage_start"] = {name: list(counts) for name, counts in self.controller.usage_counts.items()}
        t["window"], t["trace"] = _fresh_mean(), []
        t["chunk"] = _fresh_mean()
        if any(any(row) for row in t["eval_usage"].values()):
            t["last_eval_usage"] = t["eval_usage"]
        t["eval_usage"] = {name: [0] * len(self.labels) for name in t["eval_usage"]}

    # -- reporting --------------------------------------------------------------------------

    def _named(self, usage: dict[str, list[int]] | None) -> dict[str, dict[str, int]] | None:
        return None if usage is None else {name: dict(zip(self.labels, counts)) for name, counts in usage.items()}

    def window_usage(self) -> dict[str, list[int]]:
        start = self.track["usage_start"]
        return {name: [a - b for a, b in zip(counts, start[name])] for name, counts in self.controller.usage_counts.items()}

    def evaluation_usage(self) -> dict[str, list[int]] | None:
        """Per block: the choices of the evaluation just run (or the last one) over the test set."""
        t = self.track
        return t["eval_usage"] if any(any(row) for row in t["eval_usage"].values()) else t["last_eval_usage"]

    def stage_cp(self) -> dict[str, dict[str, float | int]]:
        return {
            stage: {"cp": r["cp_sum"] / r["iterations"], "target": r["target"], "iterations": r["iterations"]}
            for stage, r in self.track["stages"].items() if r["iterations"]
        }

    def precision(self) -> Precision:
        t = self.track
        window, chunk = t["window"], t["chunk"]
        trace = list(t["trace"])
        if chunk["iterations"]:
            trace.append([t["iteration"], chunk["cp_sum"] / chunk["iterations"], chunk["target_sum"] / chunk["iterations"]])
        a, w, g = t["last_bits"] if t["last_bits"] is not None else (0.0, float(cost_bits(self.config.weight_bits)), 0.0)
        extra: dict[str, Any] = {
            "cp": window["cp_sum"] / window["iterations"] if window["iterations"] else None,
            "target": self.controller.target_ratio,
            "window_target": window["target_sum"] / window["iterations"] if window["iterations"] else None,
            "last_cp": self.controller.last_cp,
            "cp_trace": trace,
            "stage_cp": self.stage_cp(),
            "candidates": list(self.labels),
            "usage": self._named(self.window_usage()),
            "eval_usage": self._named(self.evaluation_usage()),
        }
        if self.meter is not None:
            summary = self.meter.summary()
            for key in ("gated_effective_macs", "ungated_effective_macs", "gate_effective_macs", "ratio_vs_sbm_with_gate"):
                extra[key] = summary[key]
        if self.scheduler is None:
            return DFQPrecision(round(a, 3), round(w, 3), round(g, 3), None, (), extra)
        extra["threshold"] = self.scheduler.tracker.indicator.threshold
        extra["last_max_difference"] = self.scheduler.tracker.indicator.last_max_difference
        points = tuple(i for i, _ in self.scheduler.tracker.turning_points)
        return DFQPrecision(round(a, 3), round(w, 3), round(g, 3), self.scheduler.stage, points, extra)

    # -- checkpoints and export -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "tracking": copy.deepcopy(self.track),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            controller, scheduler, tracking = state["controller"], state["scheduler"], state["tracking"]
        except (KeyError, TypeError) as error:
            raise ConfigError(f"not a {self.name} method state ({error!r}); resume from a checkpoint this method wrote") from error
        if (scheduler is None) != (self.scheduler is None) or not isinstance(tracking, dict) or set(tracking) != set(TRACKING_KEYS):
            raise ConfigError(f"the checkpoint's method state does not belong to a {self.name} run")
        self.controller.load_state_dict(controller)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(scheduler)
        self.track = copy.deepcopy(tracking)

    def pinned_candidates(self) -> dict[str, str]:
        """Per block (controller name): the label of its most used candidate (see the module docstring)."""
        usage = self.track["last_eval_usage"] or self.controller.usage_counts
        if not any(any(row) for row in usage.values()):
            raise ConfigError("this DFQ model has recorded no gate choices yet (no training step, no evaluation); nothing to pin")
        return {name: self.labels[max(range(len(counts)), key=lambda k: (counts[k], -k))] for name, counts in usage.items()}

    def export_model(self):
        from fracfx.passes.pin_candidates import gate_choices, pin_candidates

        pinned = self.pinned_candidates()
        index_of = {id(module): index for index, module in gate_choices(self.model).items()}
        choices = {index_of[id(block.choice)]: self.labels.index(pinned[block.name]) for block in self.controller.blocks}
        return pin_candidates(self.model, choices=choices)


@register_method
class FracTrainMethod(DFQMethod):
    name = "fractrain"
    help = ("FracTrain: DFQ whose cp set-point starts at --target_ratio and rises by --target_ratio_step at each "
            "loss plateau (PFQ's indicator: --window, --initial_threshold, --decay, --num_turning_point)")
    options = (
        Option("target_ratio", float, 1.5, "initial cp set-point (percent of FP32 training cost of the gated ops)"),
        Option("target_ratio_step", float, 0.5, "set-point increase at each turning point"),
    ) + _COMMON_OPTIONS

    def make_scheduler(self):
        from fracfx.runtime import FracTrainScheduler

        c = self.config
        return FracTrainScheduler(
            self.controller, target_ratio_step=self.option("target_ratio_step"), window=self.plan.window,
            num_turning_point=c.num_turning_point, initial_threshold=c.initial_threshold, decay=c.decay, reduce=self.ranks,
        )
