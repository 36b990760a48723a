"""PFQ: progressive fractional quantization (docs/method.md section 2).

A PlateauTracker decides the stage; this scheduler turns the stage into bits on the model's
quantizers. Forward bits drive activations and weights, backward bits drive gradients.

    pfq = fracfx.runtime.PFQScheduler(qm, (3, 4, 6, 8), (6, 6, 8, 8), window=400)
    for x, y in loader:
        loss = criterion(qm(x), y); opt.zero_grad(); loss.backward(); opt.step()
        pfq.step(loss)          # a switch decided here is in force from the next iteration

Under DistributedDataParallel pass reduce=RankContext and step() with each rank's share of the
global mean loss (see PlateauTracker): every rank then switches at the same iteration.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from torch import nn

from fracfx.bits import MAX_BITS, check_bits
from fracfx.errors import ConfigError
from fracfx.nn.precision import set_bits
from fracfx.nn.quantizers import QUANTIZER_TYPES
from fracfx.runtime.plateau import STATE_VERSION, PlateauIndicator, PlateauTracker, check_state


def _check_schedule(schedule, what: str, length: int | None) -> tuple[int, ...]:
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Iterable):
        raise ConfigError(
            f"{what} must be a sequence of bit widths, one per stage, got {schedule!r}; "
            f"e.g. (3, 4, 6, 8) (for a fixed width repeat it: (4,) * 4)"
        )
    bits = tuple(schedule)
    for i, value in enumerate(bits):
        check_bits(value, f"{what}[{i}]")
        if value in (None, 0):
            raise ConfigError(
                f"{what}[{i}]={value!r}: a PFQ stage needs 1..{MAX_BITS} bits; "
                f"to keep a layer in FP32 use QuantConfig(keep_fp32=...)"
            )
    if length is not None and len(bits) != length:
        raise ConfigError(f"{what} has {len(bits)} stages but fw_schedule has {length}; give every schedule one entry per stage")
    return bits


class PFQScheduler:
    """Raises the precision of a transformed model in stages when the training loss plateaus."""

    def __init__(
        self,
        gm: nn.Module,
        fw_schedule: Sequence[int],
        bw_schedule: Sequence[int],
        *,
        num_turning_point: int = 3,
        initial_threshold: float = 0.05,
        decay: float = 0.3,
        window: int = 400,
        decay_turning_points: Iterable[int] = (1, 2),
        weight_schedule: Sequence[int] | None = None,
        reduce=None,
    ):
        if not isinstance(gm, nn.Module) or not any(isinstance(m, QUANTIZER_TYPES) for m in gm.modules()):
            raise ConfigError("PFQScheduler needs a model with fracfx quantizers; pass the module returned by fracfx.transform(model, config)")
        self.gm = gm
        self.fw_schedule = _check_schedule(fw_schedule, "fw_schedule", None)
        self.bw_schedule = _check_schedule(bw_schedule, "bw_schedule", len(self.fw_schedule))
        # Weights follow the forward bits unless a full schedule of their own is given; a
        # single int is refused so it cannot silently freeze the weights (a reference pitfall).
        self.weight_schedule = (
            self.fw_schedule if weight_schedule is None
            else _check_schedule(weight_schedule, "weight_schedule", len(self.fw_schedule))
        )
        indicator = PlateauIndicator(
            num_turning_point=num_turning_point, initial_threshold=initial_threshold,
            decay=decay, decay_turning_points=decay_turning_points,
        )
        if len(self.fw_schedule) < indicator.num_turning_point + 1:
            raise ConfigError(
                f"the schedules have {len(self.fw_schedule)} stages but num_turning_point={num_turning_point} needs "
                f"{num_turning_point + 1}; add stages or lower num_turning_point"
            )
        self.tracker = PlateauTracker(window=window, indicator=indicator, reduce=reduce)
        self._apply_bits()

    # -- what the training loop and loggers read ------------------------------------------
    @property
    def stage(self) -> int:
        return self.tracker.stage

    @property
    def bits(self) -> tuple[int, int, int]:
        """(activation, weight, gradient) bits in force."""
        t = self.stage
        return self.fw_schedule[t], self.weight_schedule[t], self.bw_schedule[t]

    @property
    def turning_points(self) -> list[tuple[int, float]]:
        """(iteration that closed the window, that window's mean loss) per switch."""
        return list(self.tracker.turning_points)

    @property
    def threshold(self) -> float:
        return self.tracker.indicator.threshold

    @property
    def normalizer(self) -> float | None:
        return self.tracker.indicator.normalizer

    @property
    def iteration(self) -> int:
        return self.tracker.iteration

    # -- the LR-scheduler protocol ---------------------------------------------------------
    def step(self, loss) -> bool:
        """Call once per iteration after optimizer.step(); True iff the bits changed."""
        switched = self.tracker.step(loss)
        if switched:
            self._apply_bits()
        return switched

    def _settings(self) -> dict[str, Any]:
        return {
            "fw_schedule": list(self.fw_schedule),
            "bw_schedule": list(self.bw_schedule),
            "weight_schedule": list(self.weight_schedule),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "pfq", **self._settings(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule position and put the restored stage's bits on the model."""
        check_state(state, "pfq", "PFQScheduler", self._settings())
        self.tracker.load_state_dict(state["tracker"])
        self._apply_bits()

    def _apply_bits(self) -> None:
        a, w, g = self.bits
        set_bits(self.gm, act_bits=a, weight_bits=w, grad_bits=g)

    def __repr__(self) -> str:
        return (
            f"PFQScheduler(stage={self.stage}/{self.tracker.indicator.num_turning_point}, bits={self.bits}, "
            f"iteration={self.iteration}, threshold={self.threshold:g})"
        )
