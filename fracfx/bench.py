"""Benchmarks that report ratios against a baseline measured in the same run.

Shared machines are noisy, so each benchmark interleaves the baseline and the candidate
(A, B, A, B, ...) in one process, after warm-up, and reports medians.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Timing:
    name: str
    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(candidates: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> list[Timing]:
    """Run each candidate `warmup` times, then `repeats` rounds of one call each, in turn."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            samples[name].append(_timed(fn))
    return [Timing(name, tuple(s)) for name, s in samples.items()]


def training_step(
    model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, lr: float = 0.01, extra_loss: Callable[[], torch.Tensor] | None = None
) -> Callable[[], None]:
    """One full SGD step (forward, cross-entropy [+ extra_loss()], backward, update) as a closure."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(batch), labels)
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss.backward()
        optimizer.step()

    return step
