"""The seam between a training method and the loop: a method turns the float model into a Recipe.

The loop (fracfx.train.session) trains `recipe.model` on cross-entropy plus every
`recipe.loss_terms` entry, steps each of `recipe.schedulers` with the iteration's loss after
the optimizer step (in order), counts cost with `recipe.meter`, logs `recipe.status()`, and
checkpoints the state_dict() of every scheduler and of every object in `recipe.state` under its
name (fracfx.train.checkpointing). Nothing else about a method is known to the loop.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from fracfx.train.config import Plan, TrainConfig


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Scheduler(Stateful, Protocol):
    def step(self, loss: float) -> Any:
        """Called after each optimizer step with the iteration's cross-entropy (data-parallel:
        this rank's share of the global batch's mean cross-entropy; the shares sum to it)."""


class Meter(Stateful, Protocol):
    def step(self, batch_size: int) -> float: ...

    def summary(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class MethodStatus:
    """What a method reports at a point of training: bits as the cost model counts them (FP32 = 32).

    Per-sample methods (DFQ) report the mean bits of the last batch; `extra` carries anything
    else worth logging (it lands in the metrics line as method_state); `setpoint` is DFQ's
    (cp, target) of the window so far, shown in the live label.
    """

    act: float
    weight: float
    grad: float
    stage: int | None = None
    turning_points: tuple[int, ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    setpoint: tuple[float | None, float] | None = None

    @property
    def label(self) -> str:
        if self.setpoint is not None:
            cp, target = self.setpoint
            stage = "" if self.stage is None else f"stage {self.stage} "
            steer = "" if cp is None else f"cp {cp:.2f}% (set-point {target:g}) "
            return f"{stage}{steer}A{self.act:g}/W{self.weight:g}/G{self.grad:g}"
        if self.act == self.weight == self.grad == 32:
            return "FP32"
        bits = f"FW{self.act}/BW{self.grad}" if self.act == self.weight else f"A{self.act}/W{self.weight}/G{self.grad}"
        return bits if self.stage is None else f"stage {self.stage} {bits}"


@dataclasses.dataclass
class Recipe:
    """Everything the loop needs from a method (see the module docstring).

    synchronize: data-parallel runs only, called on every rank at each evaluation before the
      metrics record and the checkpoint: fold per-rank statistics into state every rank shares.
    after_evaluate: called after each evaluation's metrics record, before its checkpoint.
    export: the trained model at one fixed precision (`fracfx export`; DFQ pins its gates).
    """

    model: nn.Module
    meter: Meter
    status: Callable[[], MethodStatus]
    loss_terms: tuple[Callable[[], torch.Tensor], ...] = ()
    schedulers: Mapping[str, Scheduler] = dataclasses.field(default_factory=dict)
    state: Mapping[str, Stateful] = dataclasses.field(default_factory=dict)
    synchronize: tuple[Callable[[], None], ...] = ()
    after_evaluate: tuple[Callable[[], None], ...] = ()
    export: Callable[[], nn.Module] | None = None

    def __post_init__(self):
        shared = set(self.schedulers) & set(self.state)
        if shared:
            raise ValueError(f"recipe names {sorted(shared)} both as a scheduler and as state; checkpoints need one name per object")

    def loss(self, ce: torch.Tensor) -> torch.Tensor:
        total = ce
        for term in self.loss_terms:
            total = total + term()
        return total

    def step(self, loss: float) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step(loss)

    def checkpointed(self) -> dict[str, Stateful]:
        return {**self.schedulers, **self.state}

    def fixed_precision_model(self) -> nn.Module:
        return self.model if self.export is None else self.export()


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What a method may read while building: the config, the plan, the data-parallel ranks.

    `ranks` is the fracfx.runtime.distributed.RankContext of a data-parallel run (else None):
    pass it as `reduce=` to the runtime objects whose decisions must be global.
    """

    config: "TrainConfig"
    plan: "Plan"
    ranks: Any = None  # fracfx.runtime.distributed.RankContext

    def option(self, name: str) -> Any:
        return self.config.options[name]
