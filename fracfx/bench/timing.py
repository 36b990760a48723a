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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (bind to port 0, read it, close)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def data_parallel_throughput(config, *, warmup: int, iters: int) -> dict:
    """Images per second of `fracfx train` steps with this config, in this process group.

    Every rank calls it (run by torchrun; a world of one is the plain single-process trainer).
    The steps are the trainer's own (Session.step: DDP forward/backward, the method's schedule,
    the cost meter); no evaluation or checkpoint is timed. Ranks meet at a barrier before and
    after the timed steps, so the time is that of the slowest rank.
    """
    import tempfile
    from pathlib import Path

    from fracfx.data import train_batches
    from fracfx.runtime import distributed
    from fracfx.train.session import Session

    launch = distributed.launch_environment()
    ranks = None if launch is None else distributed.start(launch, config.device)
    try:
        with tempfile.TemporaryDirectory() as folder:
            session = Session(config.replace(save_folder=folder), Path(folder), ranks)
            batches = train_batches(session.train_loader)
            for _ in range(warmup):
                session.step(*next(batches))
            if ranks is not None:
                ranks.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                session.step(*next(batches))
            if ranks is not None:
                ranks.barrier()
            seconds = time.perf_counter() - start
    finally:
        distributed.stop(ranks)
    processes = 1 if ranks is None else ranks.world_size
    return {"processes": processes, "threads": torch.get_num_threads(), "batch_size": config.batch_size, "iterations": iters,
            "seconds": seconds, "images_per_s": iters * config.batch_size / seconds, "rank": 0 if ranks is None else ranks.rank}
