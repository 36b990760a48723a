"""DFQ training statistics: cp against its set-point over time, and the gates' choices.

DFQUsage follows a DFQController through training. step() after each optimizer step records
the cp and set-point of that iteration's forward (the controller observed it in cost_loss()),
its stage (FracTrain) and the batch's mean bits; a forward hook counts the gates' choices in
eval mode (evaluations). end_window() closes the statistics of one evaluation window.

    usage = DFQUsage(controller, window=400)
    loss = ce + controller.cost_loss(); loss.backward(); optimizer.step(); usage.step()
    usage.cp_trace()  # [iteration, mean cp, mean set-point] per `window` iterations

Data-parallel (reduce= a RankContext): the bits are those of the global batch, and sync()
sums the evaluation's choices over the ranks' test shards.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch

from fracfx.errors import ConfigError
from fracfx.nn.gates import choice_of
from fracfx.runtime.dfq import DFQController

STATE_KIND, STATE_VERSION = "dfq_usage", 1
_FIELDS = ("iteration", "window", "chunk", "trace", "stages", "usage_start", "eval_usage", "last_eval_usage", "last_bits")


@dataclasses.dataclass
class _Mean:
    """Sums of cp and set-point over some iterations."""

    iterations: int = 0
    cp_sum: float = 0.0
    target_sum: float = 0.0

    def add(self, cp: float, target: float) -> None:
        self.iterations += 1
        self.cp_sum += cp
        self.target_sum += target

    def cp(self) -> float | None:
        return self.cp_sum / self.iterations if self.iterations else None

    def target(self) -> float | None:
        return self.target_sum / self.iterations if self.iterations else None


class DFQUsage:
    """cp, set-point, stage and candidate usage of a DFQ run (see the module docstring)."""

    def __init__(self, controller: DFQController, *, window: int, stage: Callable[[], int] = lambda: 0, reduce=None):
        if not isinstance(controller, DFQController):
            raise ConfigError("DFQUsage follows a fracfx.runtime.DFQController; pass one")
        self.controller, self.window, self.stage, self.reduce = controller, int(window), stage, reduce
        self.labels = tuple(controller.labels)
        self._bit_sums = [block.bit_sums() for block in controller.blocks]
        self._reset()
        for block in controller.blocks:
            block.choice.register_forward_hook(self._eval_counter(block.name))

    def _zeros(self) -> dict[str, list[int]]:
        return {b.name: [0] * len(self.labels) for b in self.controller.blocks}

    def _reset(self) -> None:
        self.iteration = 0
        self.since_eval, self.chunk = _Mean(), _Mean()  # since the last evaluation; the open trace window
        self.trace: list[list[float]] = []  # [iteration, mean cp, mean set-point] per closed window since the last evaluation
        self.stages: dict[str, dict[str, Any]] = {}  # per stage since the start: iterations, cp_sum, set-point
        self.usage_start = self._zeros()  # the controller's usage counts at the last evaluation
        self.eval_usage = self._zeros()  # choices of the evaluation under way
        self.last_eval_usage: dict[str, list[int]] | None = None
        self.last_bits: list[float] | None = None  # mean (a, w, g) of the last training batch

    def _eval_counter(self, name: str):
        def hook(module, inputs, mask):
            if not module.training:
                counts = torch.bincount(choice_of(mask), minlength=len(self.labels)).tolist()
                self.eval_usage[name] = [a + b for a, b in zip(self.eval_usage[name], counts)]

        return hook

    def step(self, loss: float | None = None) -> None:
        """Record the last training forward (call after the optimizer step, before a FracTrain scheduler steps)."""
        cp, target, stage = self.controller.observe(), self.controller.target_ratio, self.stage()
        self.iteration += 1
        self.since_eval.add(cp, target)
        self.chunk.add(cp, target)
        record = self.stages.setdefault(str(stage), {"iterations": 0, "cp_sum": 0.0, "target": target})
        record["iterations"] += 1
        record["cp_sum"] += cp
        if self.chunk.iterations >= self.window:
            self.trace.append([self.iteration, self.chunk.cp(), self.chunk.target()])
            self.chunk = _Mean()
        self.last_bits = self._batch_bits()

    def _batch_bits(self) -> list[float]:
        """MAC-weighted mean (a, w, g) over the gated ops and the samples of the last forward."""
        total, batch = [0.0, 0.0, 0.0], 0
        for index, (block, sums) in enumerate(zip(self.controller.blocks, self._bit_sums)):
            if self.reduce is None:
                choice = block.choice.last_choice
                batch, counts = len(choice), torch.bincount(choice, minlength=len(self.labels)).tolist()
            else:
                counts = self.controller.last_counts[index]
                batch = sum(counts)
            for k, n in enumerate(counts):
                if n:
                    total = [s + n * v for s, v in zip(total, sums[k])]
        denominator = batch * self.controller.total_macs
        return [s / denominator for s in total]

    def sync(self) -> None:
        """Data-parallel: the evaluation's choices summed over the ranks' test shards."""
        names, k = list(self.eval_usage), len(self.labels)
        total = [round(n) for n in self.reduce.sum([n for name in names for n in self.eval_usage[name]])]
        self.eval_usage = {name: total[i * k:(i + 1) * k] for i, name in enumerate(names)}

    def end_window(self) -> None:
        """After an evaluation's record: the next window starts."""
        self.usage_start = {name: list(counts) for name, counts in self.controller.usage_counts.items()}
        self.since_eval, self.chunk, self.trace = _Mean(), _Mean(), []
        if any(any(row) for row in self.eval_usage.values()):
            self.last_eval_usage = self.eval_usage
        self.eval_usage = self._zeros()

    # -- reading ------------------------------------------------------------------------------

    def cp_trace(self) -> list[list[float]]:
        """The closed trace windows since the last evaluation, plus the open one."""
        return self.trace + ([[self.iteration, self.chunk.cp(), self.chunk.target()]] if self.chunk.iterations else [])

    def window_usage(self) -> dict[str, list[int]]:
        """Per block: the training samples per candidate since the last evaluation."""
        start = self.usage_start
        return {name: [a - b for a, b in zip(counts, start[name])] for name, counts in self.controller.usage_counts.items()}

    def evaluation_usage(self) -> dict[str, list[int]] | None:
        """Per block: the choices of the evaluation just run (or the last one) over the test set."""
        return self.eval_usage if any(any(row) for row in self.eval_usage.values()) else self.last_eval_usage

    def stage_cp(self) -> dict[str, dict[str, float | int]]:
        return {stage: {"cp": r["cp_sum"] / r["iterations"], "target": r["target"], "iterations": r["iterations"]}
                for stage, r in self.stages.items() if r["iterations"]}

    def named(self, usage: dict[str, list[int]] | None) -> dict[str, dict[str, int]] | None:
        return None if usage is None else {name: dict(zip(self.labels, counts)) for name, counts in usage.items()}

    def pinned_candidates(self) -> dict[str, str]:
        """Per block: the label of its most used candidate, at the last evaluation (else in training)."""
        usage = self.last_eval_usage or self.controller.usage_counts
        if not any(any(row) for row in usage.values()):
            raise ConfigError("this DFQ model has recorded no gate choices yet (no training step, no evaluation); nothing to pin")
        return {name: self.labels[max(range(len(counts)), key=lambda k: (counts[k], -k))] for name, counts in usage.items()}

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy({
            "kind": STATE_KIND, "version": STATE_VERSION, "iteration": self.iteration,
            "window": dataclasses.asdict(self.since_eval), "chunk": dataclasses.asdict(self.chunk), "trace": self.trace,
            "stages": self.stages, "usage_start": self.usage_start, "eval_usage": self.eval_usage,
            "last_eval_usage": self.last_eval_usage, "last_bits": self.last_bits,
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also reads the untyped dict that DFQ checkpoints held before (the same keys, no kind/version)."""
        if not isinstance(state, dict) or state.get("kind", STATE_KIND) != STATE_KIND or set(state) - {"kind", "version"} != set(_FIELDS):
            raise ConfigError("not a DFQUsage state; pass the dict that DFQUsage.state_dict() returned")
        if state.get("version", STATE_VERSION) != STATE_VERSION or set(state["usage_start"]) != set(self.controller.usage_counts):
            raise ConfigError("this DFQUsage state belongs to another model or fracfx version")
        state = copy.deepcopy(state)
        self.iteration = int(state["iteration"])
        self.since_eval, self.chunk = _Mean(**state["window"]), _Mean(**state["chunk"])
        self.trace, self.stages = state["trace"], state["stages"]
        self.usage_start, self.eval_usage, self.last_eval_usage = state["usage_start"], state["eval_usage"], state["last_eval_usage"]
        self.last_bits = state["last_bits"]

    def __repr__(self) -> str:
        return f"DFQUsage(iteration={self.iteration}, blocks={len(self.usage_start)}, window={self.window})"
