"""Training cost as it accrues, in effective MACs (docs/method.md section 5).

CostMeter adds, per iteration, batch_size * the model's effective MACs per sample at the bits in
force, and the same for the two baselines: FP32 training and static 8-bit training (SBM). The
per-sample value is computed with fracfx.cost_model.analyze_cost once per distinct bits
assignment and cached, so step() costs a tuple of ints and a dict lookup.

pfq_cost_fraction is the per-iteration cost the reference logs for PFQ (section 2).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from fracfx import cost_model
from fracfx.bits import check_bits, cost_bits
from fracfx.cost_model import FP32_BITOPS, Totals, step_bitops
from fracfx.errors import ConfigError
from fracfx.nn.quantizers import QUANTIZER_TYPES
from fracfx.runtime.plateau import STATE_VERSION, check_state


def pfq_cost_fraction(fw_bits: int, bw_bits: int) -> float:
    """[a*a + a*g + a*g] / (3 * 32 * 32): one PFQ step's cost as a fraction of FP32 (weights at a).

    0 or None means FP32 and counts as 32 bits. E.g. (8, 8) -> 0.0625, (8, 16) -> 0.1042.
    """
    a = cost_bits(check_bits(fw_bits, "fw_bits"))
    g = cost_bits(check_bits(bw_bits, "bw_bits"))
    return step_bitops(a, a, g) / (3 * FP32_BITOPS)


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1 (the samples in this iteration), got {batch_size!r}")
    return batch_size


class Meter(Totals):
    """What every cost meter counts: iterations, samples, and the baselines, which scale with the
    sample count alone (fp32_per_sample, sbm_per_sample are set by the meter)."""

    iterations: int
    samples: int
    fp32_per_sample: float
    sbm_per_sample: float

    def _advance(self, batch_size: int) -> None:
        self.iterations += 1
        self.samples += batch_size

    @property
    def fp32_effective_macs(self) -> float:
        return self.fp32_per_sample * self.samples

    @property
    def sbm_effective_macs(self) -> float:
        return self.sbm_per_sample * self.samples

    def summary(self) -> dict[str, float | int]:
        return {"iterations": self.iterations, "samples": self.samples, **self.totals()}


class CostMeter(Meter):
    """Accumulates effective MACs of training `gm` (made with fracfx.transform(..., example_inputs=...))."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._quantizers = [m for m in gm.modules() if isinstance(m, QUANTIZER_TYPES)]
        report = cost_model.analyze_cost(gm)  # raises ConfigError when MACs are unknown: better now than at step 1
        self.macs_per_sample = report.macs
        self.fp32_per_sample = report.fp32_effective_macs
        self.sbm_per_sample = report.sbm_effective_macs
        self._per_sample_cache: dict[tuple[int, ...], float] = {self._bits_key(): report.effective_macs}
        self.iterations = 0
        self.samples = 0
        self.effective_macs = 0.0

    def _bits_key(self) -> tuple[int, ...]:
        return tuple(m.current_bits for m in self._quantizers)

    @property
    def per_sample(self) -> float:
        """Effective MACs per sample of one training step at the bits in force now."""
        key = self._bits_key()
        value = self._per_sample_cache.get(key)
        if value is None:
            value = self._per_sample_cache[key] = cost_model.analyze_cost(self.gm).effective_macs
        return value

    def step(self, batch_size: int) -> float:
        """Account one iteration on `batch_size` samples (the actual one); returns its effective MACs."""
        cost = self.per_sample * check_batch_size(batch_size)
        self._advance(batch_size)
        self.effective_macs += cost
        return cost

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": "cost_meter",
            "macs_per_sample": self.macs_per_sample,
            "iterations": self.iterations,
            "samples": self.samples,
            "effective_macs": self.effective_macs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, "cost_meter", "CostMeter")
        if state.get("macs_per_sample") != self.macs_per_sample:
            raise ConfigError(
                f"CostMeter state was recorded on a model with {state.get('macs_per_sample')} MACs per sample, "
                f"this one has {self.macs_per_sample}; resume with the same model and example_inputs shape"
            )
        try:
            iterations, samples = int(state["iterations"]), int(state["samples"])
            effective_macs = float(state["effective_macs"])
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"CostMeter state is incomplete or malformed ({error!r}); pass what state_dict() returned") from error
        self.iterations, self.samples, self.effective_macs = iterations, samples, effective_macs
