"""train(): the one training loop behind `fracfx train`, for every method.

    from fracfx.train import TrainConfig, train
    result = train(TrainConfig(method="pfq", arch="cifar_resnet20", epochs=1, save_folder="runs/pfq"))

`train(config, resume="runs/pfq")` continues from the run's checkpoint and ends with the same
weights and metrics as a run that was never interrupted (fracfx.train.checkpointing).
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

from torch import nn

from fracfx.train import checkpointing
from fracfx.train.config import TrainConfig
from fracfx.train.data_parallel import ProcessGroup
from fracfx.train.display import Display, summary_table
from fracfx.train.metrics import run_summary
from fracfx.train.session import Session


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    metrics: list[dict]
    summary: dict


def train(config: TrainConfig | None = None, *, resume: str | os.PathLike | None = None, progress: bool | None = None,
          console=None, log_every: int = 0) -> TrainResult:
    """Train (or resume) a run; returns the model, metrics and summary.

    config: required for a fresh run; with resume, the checkpoint's config is used and a given
      config must agree with it (fields left at their defaults are not compared; `workers` and
      `device` may change).
    progress: None shows a live display only on a terminal.
    log_every: without the live display, also print a short line every N iterations (0: only
      at evaluations).

    Run by torchrun with WORLD_SIZE > 1, every rank calls this: DistributedDataParallel on the
    process group (gloo on CPU, nccl on CUDA), --batch-size split over the ranks, schedules
    decided on global statistics, checkpoints written by rank 0 (fracfx.train.data_parallel).
    After an elastic restart (torchrun --max-restarts) a run whose --save-folder holds a
    checkpoint resumes from it.
    """
    from rich.console import Console

    from fracfx.runtime import distributed

    launch = distributed.launch_environment()
    main = launch is None or launch.rank == 0
    console = console or Console()
    if not main:
        console = Console(file=io.StringIO())
    config, run_dir, state = checkpointing.open_run(config, resume, restart_count=0 if launch is None else launch.restart_count, console=console)
    with ProcessGroup(launch, config.device, run_dir) as group:
        session = group.session = Session(config, run_dir, group.ranks)
        if state is not None:
            checkpointing.restore(session, state)
        else:
            session.start()
        title = f"{config.method} {config.arch} {config.dataset}" + ("" if group.ranks is None else f" on {group.ranks.world_size} ranks")
        display = Display(console, session.task, session.plan.iterations, session.iteration, enabled=progress if main else False,
                          title=title, log_every=log_every)
        run_loop(session, display)
    summary = run_summary(config, session.plan, session.metrics, session.recipe.meter.summary(), session.elapsed(), session.task)
    if group.ranks is not None:
        summary["ranks"] = group.ranks.world_size
    session.folder.write_summary(summary)
    console.print(summary_table(summary, session.task))
    return TrainResult(run_dir, session.model, session.metrics, summary)


def run_loop(session: Session, display: Display) -> None:
    """Train from the session's iteration to the end of the plan, evaluating and checkpointing on the way."""
    from fracfx.data import train_batches

    with display:
        if session.finished:
            return
        for index, inputs, targets in train_batches(session.train_loader, session.iteration):
            loss = session.step(index, inputs, targets)
            display.update(session.iteration, loss, session.train_acc, session.recipe.status(), session.recipe.meter.summary())
            if session.iteration % session.plan.eval_every == 0 or session.finished:
                display.evaluated(session.evaluate_and_checkpoint())
            if session.finished:
                return
