"""The loss-plateau indicator of docs/method.md section 2, with no model attached.

`PlateauIndicator` sees one mean loss per window and decides turning points; `PlateauTracker`
feeds it from per-iteration losses. PFQ (bits) and FracTrain (the DFQ cost target) both put
their own reaction on top of a tracker and read its `stage`.

Window e (1-based), loss l_e:
  S  = mean(l_1 .. l_min(e, 10)), updated before the test, then frozen
  d_j = |l_(e-4+j) - l_e| / S, j = 0..3, once the FIFO of the last 5 window losses is full
  turning point iff max_j d_j <= eps; then stage += 1, eps *= decay at the listed turning
  points, FIFO cleared; after N turning points nothing changes any more.

A non-finite window loss never gives a turning point (every comparison with NaN is False).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from fracfx.errors import ConfigError

FIFO_SIZE = 5  # K: the current window loss and the 4 before it
NORMALIZER_WINDOWS = 10  # S averages the first 10 window losses, then stays fixed
STATE_VERSION = 1


def _check_positive_float(value, what: str, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a finite number > 0, got {value!r}; {fix}")
    return float(value)


def _check_int(value, what: str, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be an int >= {minimum}, got {value!r}; {fix}")
    return value


def check_state(state, kind: str, owner: str, settings: dict | None = None) -> None:
    """Refuse a state_dict that is not `owner`'s (a dict of this `kind` and STATE_VERSION) or was
    saved with other settings than `settings` (resuming would silently change the run)."""
    if not isinstance(state, dict) or state.get("kind") != kind or state.get("version") != STATE_VERSION:
        raise ConfigError(f"not a {owner} state; pass the dict that {owner}.state_dict() returned")
    if settings:
        _check_settings(state, settings, owner)


def _check_settings(saved: dict, expected: dict, owner: str) -> None:
    """Resuming with different settings would silently change the schedule: refuse it."""
    for key, value in expected.items():
        if key not in saved:
            raise ConfigError(f"{owner} state has no {key!r}; pass the dict that {owner}.state_dict() returned")
        if saved[key] != value:
            raise ConfigError(
                f"{owner} state was saved with {key}={saved[key]!r} but this one has {key}={value!r}; "
                f"construct it with the same settings as the run you resume"
            )


class PlateauIndicator:
    """Decides turning points from one mean training loss per window (plain Python state)."""

    def __init__(
        self,
        *,
        num_turning_point: int = 3,
        initial_threshold: float = 0.05,
        decay: float = 0.3,
        decay_turning_points: Iterable[int] = (1, 2),
    ):
        self.num_turning_point = _check_int(num_turning_point, "num_turning_point", 0, "it is N, the number of stage switches")
        self.initial_threshold = _check_positive_float(initial_threshold, "initial_threshold", "the paper uses 0.05 (ImageNet) or 0.15 (CIFAR)")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ConfigError(f"decay must be in (0, 1], got {decay!r}; use 1 to keep the threshold fixed")
        self.decay = float(decay)
        if isinstance(decay_turning_points, (str, bytes, int)):
            raise ConfigError(f"decay_turning_points must be a sequence of ints, got {decay_turning_points!r}; write e.g. (1, 2)")
        points = tuple(decay_turning_points)
        for point in points:
            _check_int(point, "each entry of decay_turning_points", 1, "turning points are numbered from 1")
        # Entries beyond N never fire; allowed so the default (1, 2) works for any N.
        self.decay_turning_points = tuple(sorted(set(points)))
        self.reset()

    def reset(self) -> None:
        self.windows = 0  # window losses seen so far (e of the last one)
        self.stage = 0  # turning points so far
        self.threshold = self.initial_threshold
        self.last_max_difference: float | None = None  # max_j d_j of the last full-FIFO test
        self._fifo: list[float] = []
        self._normalizer_sum = 0.0
        self._normalizer_count = 0

    @property
    def done(self) -> bool:
        return self.stage >= self.num_turning_point

    @property
    def normalizer(self) -> float | None:
        """S, or None before the first window."""
        return self._normalizer_sum / self._normalizer_count if self._normalizer_count else None

    def update(self, window_loss: float) -> bool:
        """Take l_e for the next window; True iff that window is a turning point."""
        loss = float(window_loss)
        self.windows += 1
        if self.done:
            return False
        if self._normalizer_count < NORMALIZER_WINDOWS:
            self._normalizer_sum += loss
            self._normalizer_count += 1
        self._fifo.append(loss)
        if len(self._fifo) > FIFO_SIZE:
            del self._fifo[0]
        if len(self._fifo) < FIFO_SIZE:
            return False
        differences = [self._difference(previous, loss) for previous in self._fifo[:-1]]
        self.last_max_difference = max(differences, key=lambda d: math.inf if math.isnan(d) else d)
        if not all(d <= self.threshold for d in differences):  # <=: equality switches
            return False
        self.stage += 1
        if self.stage in self.decay_turning_points:
            self.threshold *= self.decay
        self._fifo.clear()
        return True

    def _difference(self, previous: float, current: float) -> float:
        # fracfx: divide by |S| so an objective that goes negative still measures relative change;
        # identical to the paper for the usual non-negative losses. S = 0 only if every loss was 0.
        scale = abs(self.normalizer)
        if scale == 0:
            return 0.0 if previous == current else math.inf
        return abs(previous - current) / scale

    def _settings(self) -> dict[str, Any]:
        return {
            "num_turning_point": self.num_turning_point,
            "initial_threshold": self.initial_threshold,
            "decay": self.decay,
            "decay_turning_points": list(self.decay_turning_points),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **self._settings(),
            "windows": self.windows,
            "stage": self.stage,
            "threshold": self.threshold,
            "last_max_difference": self.last_max_difference,
            "fifo": list(self._fifo),
            "normalizer_sum": self._normalizer_sum,
            "normalizer_count": self._normalizer_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError(f"not a PlateauIndicator state (version {STATE_VERSION}); pass what PlateauIndicator.state_dict() returned")
        _check_settings(state, self._settings(), "PlateauIndicator")
        try:  # read everything first so a bad dict leaves this indicator untouched
            stage = int(state["stage"])
            windows = int(state["windows"])
            threshold = float(state["threshold"])
            last = state["last_max_difference"]
            last = None if last is None else float(last)
            fifo = [float(x) for x in state["fifo"]]
            normalizer_sum = float(state["normalizer_sum"])
            normalizer_count = int(state["normalizer_count"])
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"PlateauIndicator state is incomplete or malformed ({error!r}); pass what state_dict() returned") from error
        if not 0 <= stage <= self.num_turning_point:
            raise ConfigError(f"PlateauIndicator state has stage {stage}, outside 0..{self.num_turning_point}")
        self.windows, self.stage, self.threshold, self.last_max_difference = windows, stage, threshold, last
        self._fifo, self._normalizer_sum, self._normalizer_count = fifo, normalizer_sum, normalizer_count


def _as_loss(loss) -> float | torch.Tensor:
    """A detached scalar: a float, or a 0-d float64 tensor left on its device (no sync per step)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ConfigError(f"step() needs the scalar training loss, got a tensor of shape {tuple(loss.shape)}; pass loss.mean()")
        if loss.device.type == "mps":  # no float64 there; pay the sync instead
            return float(loss.detach())
        return loss.detach().reshape(()).to(torch.float64)
    # Anything with __float__ (numpy scalars too) but not str/bool, which float() would accept or misread.
    if isinstance(loss, (bool, str, bytes)) or not hasattr(loss, "__float__"):
        raise ConfigError(f"step() needs the training loss as a float or a 0-d tensor, got {type(loss).__name__}")
    return float(loss)


class PlateauTracker:
    """Averages per-iteration losses over windows of `window` iterations and feeds a PlateauIndicator.

    Iterations are counted from 1: a turning point (iteration i, l) means step i closed the window
    whose mean loss was l, and the new stage is in force from iteration i + 1.

    Data-parallel runs pass `reduce` (fracfx.runtime.distributed.RankContext) and step() each
    rank with its share of the iteration's global mean loss (local mean * local / global batch):
    the shares are summed over ranks once per window (one all_reduce), so every rank sees the
    global window loss and switches at the same iteration. sync() folds the open window's
    shares into a sum every rank holds; call it on every rank before state_dict().
    """

    def __init__(self, *, window: int = 400, indicator: PlateauIndicator | None = None, reduce=None):
        self.window = _check_int(window, "window", 1, "it is the number of iterations per window (the paper uses 400 on CIFAR, one epoch on ImageNet)")
        self.indicator = PlateauIndicator() if indicator is None else indicator
        if reduce is not None and not callable(getattr(reduce, "sum", None)):
            raise ConfigError("reduce must have sum(values) -> list[float] (a fracfx.runtime.distributed.RankContext), or be None")
        self.reduce = reduce
        self.iteration = 0
        self.turning_points: list[tuple[int, float]] = []
        # Summed in float64 (a Python float, or a tensor on the loss's device) so float and
        # tensor losses give bit-identical window means.
        self._window_sum: float | torch.Tensor = 0.0
        self._window_count = 0
        self._synced_sum = 0.0  # with reduce: the part of the open window already summed over ranks

    @property
    def stage(self) -> int:
        return self.indicator.stage

    def step(self, loss) -> bool:
        """Record one iteration's loss; True iff this step closed a window that is a turning point."""
        self._window_sum = self._window_sum + _as_loss(loss)
        self._window_count += 1
        self.iteration += 1
        if self._window_count < self.window:
            return False
        if self.reduce is None:
            window_loss = float(self._window_sum) / self._window_count
        else:
            window_loss = (self._synced_sum + self.reduce.sum([float(self._window_sum)])[0]) / self._window_count
            self._synced_sum = 0.0
        self._window_sum, self._window_count = 0.0, 0
        if not self.indicator.update(window_loss):
            return False
        self.turning_points.append((self.iteration, window_loss))
        return True

    def sync(self) -> None:
        """With reduce: sum the open window's per-rank losses over ranks now (a collective; no-op without reduce)."""
        if self.reduce is not None:
            self._synced_sum += self.reduce.sum([float(self._window_sum)])[0]
            self._window_sum = 0.0

    def state_dict(self) -> dict[str, Any]:
        if self.reduce is not None and float(self._window_sum) != 0.0:
            raise ConfigError("this PlateauTracker holds losses not yet summed over ranks; call sync() on every rank before state_dict()")
        return {
            "version": STATE_VERSION,
            "window": self.window,
            "iteration": self.iteration,
            "window_sum": float(self._window_sum) if self.reduce is None else self._synced_sum,
            "window_count": self._window_count,
            "turning_points": [[i, l] for i, l in self.turning_points],
            "indicator": self.indicator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError(f"not a PlateauTracker state (version {STATE_VERSION}); pass what PlateauTracker.state_dict() returned")
        _check_settings(state, {"window": self.window}, "PlateauTracker")
        try:
            iteration = int(state["iteration"])
            window_sum = float(state["window_sum"])
            window_count = int(state["window_count"])
            turning_points = [(int(i), float(l)) for i, l in state["turning_points"]]
            indicator_state = state["indicator"]
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"PlateauTracker state is incomplete or malformed ({error!r}); pass what state_dict() returned") from error
        if not 0 <= window_count < self.window:
            raise ConfigError(f"PlateauTracker state has {window_count} iterations in the open window, outside 0..{self.window - 1}")
        self.indicator.load_state_dict(indicator_state)
        self.iteration, self._window_count = iteration, window_count
        if self.reduce is None:
            self._window_sum = window_sum
        else:  # the saved sum is over all ranks already
            self._window_sum, self._synced_sum = 0.0, window_sum
        self.turning_points = turning_points
