"""The files of a run folder (--save-folder):

    config.json     the resolved config, the plan, the dataset, the method's help, torch's version
    metrics.jsonl   one JSON line per evaluation (fracfx.train.metrics.metrics_record)
    checkpoint.pt   written atomically at every evaluation and at the end (fracfx.train.checkpointing)
    summary.json    the run's summary, at the end

Only the TIMING_KEY part of a metrics line may differ between two identical runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from fracfx.errors import CheckpointError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
TIMING_KEY = "timing"  # the only part of a metrics line that may differ between identical runs


def write_atomic(path: Path, text: str) -> None:
    from fracfx.runtime.checkpoint import atomic_write

    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def json_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=True) + "\n"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def resolve_checkpoint(resume: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory holding checkpoint.pt."""
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; --resume takes a run directory or its {CHECKPOINT}")
    return path


class RunFolder:
    """Writes one run's files; only the main process of a data-parallel run writes (`writes`)."""

    def __init__(self, path: Path, *, writes: bool = True):
        self.path, self.writes = Path(path), writes
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def start(self, config, plan, dataset: dict[str, Any], method_help: str) -> None:
        """A fresh run: config.json, no metrics yet."""
        import torch

        if not self.writes:
            return
        (self.path / METRICS).unlink(missing_ok=True)
        write_atomic(self.path / CONFIG, json.dumps(
            {"config": config.to_dict(), "plan": dataclasses.asdict(plan), "dataset": dataset,
             "method_help": method_help, "torch": torch.__version__}, indent=2, sort_keys=True) + "\n")

    def append_metrics(self, record: dict) -> None:
        if self.writes:
            with open(self.path / METRICS, "a", encoding="utf-8") as handle:
                handle.write(json_line(record))

    def rewrite_metrics(self, records: list[dict]) -> None:
        """After a resume: lines written after the checkpoint belong to iterations that will be redone."""
        if self.writes:
            write_atomic(self.path / METRICS, "".join(json_line(m) for m in records))

    def write_summary(self, summary: dict) -> None:
        if self.writes:
            write_atomic(self.path / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def saved_dataset(state: dict, path: Path) -> dict[str, Any] | None:
    """The dataset record of a checkpoint, else of the config.json beside it (same config), else None."""
    if isinstance(state.get("dataset"), dict):
        return dict(state["dataset"])
    beside = path.parent / CONFIG
    if beside.is_file():
        saved = json.loads(beside.read_text(encoding="utf-8"))
        if saved.get("config") == state["config"] and isinstance(saved.get("dataset"), dict):
            return saved["dataset"]
    return None


def saved_method(run: str | os.PathLike) -> str | None:
    """The method of a run folder or checkpoint (config.json, else the checkpoint); None if unreadable."""
    from fracfx.errors import FracfxError

    try:
        path = resolve_checkpoint(run)
    except FracfxError:
        return None
    try:
        return json.loads((path.parent / CONFIG).read_text(encoding="utf-8"))["config"]["method"]
    except (OSError, ValueError, KeyError, TypeError):
        from fracfx.runtime.checkpoint import load_checkpoint

        return load_checkpoint(path)["config"]["method"]
