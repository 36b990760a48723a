"""Must-show: a run killed with SIGKILL and resumed ends exactly like an uninterrupted run.

Two `fracfx train` subprocesses start together with the same seed: one runs to the end, the
other is SIGKILLed right after an iteration's optimizer step (tests/train/killed.py), so no
cleanup code runs and the iterations since the last checkpoint are lost, as in a real crash.
The crashed run is then resumed with --resume. Its
final weights, optimizer state, PFQ indicator state and metrics must equal the uninterrupted
run's exactly (torch.equal on every tensor; identical metrics lines except the timing field).

Setup: PFQ on a 320-sample Fashion-MNIST subset, CIFAR ResNet-20, batch 16 (20 batches per
epoch), 40 iterations, windows of 2 iterations and a threshold so large that every full FIFO is
a turning point (iterations 10, 20, 30), evaluation and checkpoints every 8 iterations. The crash
at iteration 19 comes after the checkpoint at 16, mid-epoch, with the indicator's FIFO half
full and one turning point behind it; the resumed run must redo 17-19 with the same data,
augmentation and rounding noise and find the next turning point at iteration 20.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fracfx.runtime.checkpoint import load_checkpoint
from fracfx.train import TIMING_KEY

REPO = Path(__file__).resolve().parents[2]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FASHION.exists(), reason="needs `apt-get install dataset-fashion-mnist`")

ARGS = [
    "--method", "pfq", "--arch", "cifar_resnet20", "--train-subset", "320", "--test-subset", "96",
    "--batch-size", "16", "--iters", "40", "--eval-every", "8", "--window", "2", "--initial-threshold", "10",
    "--seed", "3", "--threads", "1", "--no-progress",
]
CRASH_AT = 19


def _launch(folder: Path, *extra: str, args: list[str] = ARGS, killed_after: int | None = None) -> subprocess.Popen:
    """`fracfx train ARGS --save-folder FOLDER EXTRA` in a subprocess; SIGKILLed after iteration `killed_after`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    program = ["fracfx"] if killed_after is None else ["tests.train.killed", str(killed_after), "0"]
    return subprocess.Popen(
        [sys.executable, "-m", *program, "train", *args, "--save-folder", str(folder), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def _metrics(folder: Path) -> list[dict]:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop(TIMING_KEY)
    return lines


def _assert_same_tree(a, b, where: str = "checkpoint") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tree(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def test_sigkilled_run_resumes_to_identical_weights_and_metrics(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    runs = [_launch(straight), _launch(crashed, killed_after=CRASH_AT)]
    (straight_rc, straight_out), (crash_rc, crash_out) = [_finish(p) for p in runs]
    assert straight_rc == 0, straight_out
    assert crash_rc == -signal.SIGKILL, crash_out

    interrupted = load_checkpoint(crashed / "checkpoint.pt")
    assert interrupted["iteration"] == 16 and not interrupted["finished"]
    assert [m["iteration"] for m in _metrics(crashed)] == [8, 16]
    assert interrupted["method"]["scheduler"]["tracker"]["turning_points"][0][0] == 10

    rc, output = _finish(_launch(crashed, "--resume", str(crashed)))
    assert rc == 0, output

    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(crashed / "checkpoint.pt")
    assert a["finished"] and b["finished"] and a["iteration"] == b["iteration"] == 40
    tensors = [k for k, v in a["model"].items() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 100  # weights, BN stats, quantizer bits and ranges; plus generator states
    for key in ("model", "optimizer", "lr_schedule", "method", "cost", "rng", "data", "accumulators"):
        _assert_same_tree(a[key], b[key], key)
    for record in a["metrics"] + b["metrics"]:
        record.pop(TIMING_KEY)
    assert a["metrics"] == b["metrics"]
    metrics = _metrics(straight)
    assert metrics == _metrics(crashed) == a["metrics"]
    assert [m["iteration"] for m in metrics] == [8, 16, 24, 32, 40]
    assert metrics[-1]["turning_points"] == [10, 20, 30]
    assert [m["stage"] for m in metrics] == [0, 1, 2, 3, 3]
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (straight, crashed)]
    for summary in summaries:
        summary.pop("elapsed_s")
    assert summaries[0] == summaries[1]
