"""Data-parallel `fracfx train` under torchrun (2 CPU processes, gloo on 127.0.0.1).

Must-show (slow, each launches torchrun):
- agreement: 2 ranks and 1 process at the same global batch (16) end with the same weights.
  Stochastic rounding is off (--no-stochastic-grad) and the batch statistics are global
  (--sync-ranges: quantizer min/max; --sync-bn: BatchNorm). Tolerances, relative to the largest
  parameter: 1e-5 for PFQ (6 -> 8 bits, a model without BatchNorm) and 2e-5 for FP32 with
  BatchNorm. That is float32 round-off compounding over 8 SGD steps at lr 0.1: the per-batch
  sums are reassociated (two half-batch sums plus an all_reduce), ~1e-7 relative per step,
  which BatchNorm on 8-sample halves amplifies (measured 2e-6 and 5.6e-6). Quantized training
  amplifies any float difference that moves a value across a rounding boundary into a whole
  grid step, so longer, lower-bit or BatchNorm runs drift further (tiny_cnn at 8 bits: one
  process with 1 vs 2 threads drifts as far as 2 ranks from 1); the controls show that the
  tolerances are tight: without the syncs the same runs differ 300x and 2000x beyond them. Both ranks end bit-identical (the checkpoint
  holds each rank's SHA-256 of its parameters) with the turning point at the same iteration.
- a rank SIGKILLed mid-run ends the run with a clear error; `--resume` (and, separately,
  torchrun's own elastic restart) continues from the last checkpoint and ends bit-identical
  to an uninterrupted 2-rank run: weights, optimizer, indicator, every rank's RNG and
  rounding streams, metrics.

Fast: the sampler's shards, config flags, and the resume rules that need no processes.
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

from fracfx.bench.timing import free_port
from fracfx.data import EpochBatchSampler, rank_shard
from fracfx.errors import CheckpointError, ConfigError
from fracfx.runtime.checkpoint import load_checkpoint, save_checkpoint
from fracfx.train import TIMING_KEY, TrainConfig, train
from fracfx.train.checkpointing import open_run
from tests.train.test_checkpointing import _assert_same_tree

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="needs `apt-get install dataset-fashion-mnist`")
REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 300  # one torchrun launch; a hang fails the test instead of CI


COMMON = ["--train-subset", "96", "--test-subset", "40", "--batch-size", "16", "--seed", "1", "--threads", "1", "--no-progress"]
PFQ = ["--method", "pfq", "--arch", "tests.train.nets:plain_cnn", "--iters", "8", "--eval-every", "4", "--window", "1",
       "--initial-threshold", "10", "--num-turning-point", "1", "--num-bits-schedule", "6", "8", "--num-grad-bits-schedule", "8", "8",
       "--no-stochastic-grad"]
FP32_BN = ["--method", "fp32", "--arch", "tests.train.nets:tiny_cnn", "--iters", "8", "--eval-every", "4"]
RESUME = ["--method", "pfq", "--arch", "tests.train.nets:tiny_cnn", "--iters", "12", "--eval-every", "4", "--window", "1",
          "--initial-threshold", "10"]  # stochastic rounding on, per-rank statistics: the default data-parallel run
SYNC = ["--sync-bn", "--sync-ranges"]


def torchrun(folder: Path, *args: str, restarts: int = 0, killed_after: int | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m fracfx train ...` on 127.0.0.1 and a free port (c10d rendezvous with restarts);
    with killed_after, rank 1 is SIGKILLed after that iteration in the first attempt (tests/train/killed.py)."""
    port = free_port()
    rendezvous = (["--max-restarts", str(restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"] if restarts
                  else ["--master_addr", "127.0.0.1", "--master_port", str(port)])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *rendezvous,
               "-m", *(["fracfx"] if killed_after is None else ["tests.train.killed", str(killed_after), "1"]),
               "train", *args, "--save-folder", str(folder)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    if restarts:  # torch 2.14's shared rendezvous store can hand restarted ranks the old attempt's peers (pytorch#135712)
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def single(folder: Path, *args: str) -> dict:
    """The same run in this process (plain `fracfx train`); its checkpoint."""
    from fracfx.cli.train import config_from_args
    from fracfx.cli import build_parser

    parsed = build_parser().parse_args(["train", *args, "--save-folder", str(folder)])
    train(config_from_args(parsed), progress=False, console=_quiet())
    return load_checkpoint(folder / "checkpoint.pt")


def _quiet():
    import io

    from rich.console import Console

    return Console(file=io.StringIO())


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def _largest_difference(a: dict, b: dict) -> tuple[float, float]:
    """(max |a - b| over all parameters, max |a| over all parameters) of two checkpoints' models."""
    names = [k for k, v in a["model"].items() if isinstance(v, torch.Tensor) and v.is_floating_point() and "running" not in k]
    return (max(float((a["model"][k] - b["model"][k]).abs().max()) for k in names),
            max(float(a["model"][k].abs().max()) for k in names))


def _rank_fingerprints(state: dict) -> list[dict]:
    ranks = state["distributed"]["ranks"]
    assert state["distributed"]["world_size"] == len(ranks) == 2
    return [r["fingerprint"] for r in ranks]


# --- must-show: agreement with one process --------------------------------------------------------


@needs_fashion
@pytest.mark.slow
@pytest.mark.parametrize("args, tolerance, turning_points", [(PFQ, 1e-5, [5]), (FP32_BN, 2e-5, [])], ids=["pfq", "fp32-batchnorm"])
def test_two_ranks_agree_with_one_process_at_the_same_global_batch(tmp_path, args, tolerance, turning_points):
    one = single(tmp_path / "one", *args, *COMMON, *SYNC)
    done = torchrun(tmp_path / "two", *args, *COMMON, *SYNC)
    _ok(done)
    two = load_checkpoint(tmp_path / "two" / "checkpoint.pt")

    prints = _rank_fingerprints(two)
    assert prints[0]["parameters_sha256"] == prints[1]["parameters_sha256"]  # identical parameters on both ranks
    assert prints[0]["buffers_sha256"] == prints[1]["buffers_sha256"]
    assert prints[0]["schedule"]["turning_points"] == prints[1]["schedule"]["turning_points"] == turning_points
    assert one["metrics"][-1]["turning_points"] == two["metrics"][-1]["turning_points"] == turning_points
    assert [m["stage"] for m in one["metrics"]] == [m["stage"] for m in two["metrics"]]

    difference, scale = _largest_difference(one, two)
    assert difference <= tolerance * scale, (difference, scale)
    for a, b in zip(one["metrics"], two["metrics"]):
        assert a["test_acc"] == b["test_acc"] and a["train_acc"] == b["train_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["effective_macs"] == b["effective_macs"]  # the cost meter counts the global batch

    control = torchrun(tmp_path / "control", *args, *COMMON)  # per-rank statistics: not the one-process run
    _ok(control)
    difference, scale = _largest_difference(one, load_checkpoint(tmp_path / "control" / "checkpoint.pt"))
    assert difference > 100 * tolerance * scale, (difference, scale)


# --- must-show: a rank dies, the run resumes with nothing lost ---------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp") / "straight"
    _ok(torchrun(folder, *RESUME, *COMMON))
    return load_checkpoint(folder / "checkpoint.pt"), folder


def _assert_same_run(a: dict, b: dict, a_folder: Path, b_folder: Path) -> None:
    for key in ("model", "optimizer", "lr_schedule", "method", "cost", "rng", "data", "accumulators", "distributed"):
        _assert_same_tree(a[key], b[key], key)
    for record in a["metrics"] + b["metrics"]:
        record.pop(TIMING_KEY, None)
    assert a["metrics"] == b["metrics"]
    lines = [[json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()] for f in (a_folder, b_folder)]
    for line in lines[0] + lines[1]:
        line.pop(TIMING_KEY)
    assert lines[0] == lines[1] == a["metrics"]


@needs_fashion
@pytest.mark.slow
def test_killed_rank_ends_the_run_clearly_and_resume_loses_nothing(straight_run, tmp_path):
    straight, straight_folder = straight_run
    folder = tmp_path / "crashed"
    crashed = torchrun(folder, *RESUME, *COMMON, killed_after=6)
    assert crashed.returncode != 0
    output = crashed.stdout + crashed.stderr
    assert f"-{int(signal.SIGKILL)} " in output or "SIGKILL" in output  # torchrun names the rank that died
    # rank 0 sees the peer vanish, or torchrun stops it first: either way it says what happened and how to go on
    assert "fracfx train: error: rank 0 of 2 stopped during iteration 7: it " in output, output[-3000:]
    assert "it lost contact with another rank" in output or "it received SIGTERM" in output
    assert f"--resume {folder}" in output and "(iteration 4)" in output

    interrupted = load_checkpoint(folder / "checkpoint.pt")
    assert interrupted["iteration"] == 4 and not interrupted["finished"]

    _ok(torchrun(folder, "--resume", str(folder), "--threads", "1", "--no-progress"))
    resumed = load_checkpoint(folder / "checkpoint.pt")
    assert resumed["finished"] and resumed["metrics"][-1]["turning_points"] == [5, 10]
    _assert_same_run(straight, resumed, straight_folder, folder)


@needs_fashion
@pytest.mark.slow
def test_torchrun_elastic_restart_resumes_from_the_last_checkpoint(straight_run, tmp_path):
    straight, straight_folder = straight_run
    folder = tmp_path / "elastic"
    done = torchrun(folder, *RESUME, *COMMON, restarts=1, killed_after=6)
    _ok(done)
    assert "torchrun restart 1: resuming" in done.stdout
    _assert_same_run(straight, load_checkpoint(folder / "checkpoint.pt"), straight_folder, folder)


# --- fast: shards, flags, resume rules -----------------------------------------------------------


def test_rank_shards_of_every_global_batch_are_the_single_process_batch():
    whole = EpochBatchSampler(51, 8, seed=3)  # last batch: 3 samples, one per rank
    shards = [EpochBatchSampler(51, 8, seed=3, rank=r, world_size=3) for r in range(3)]
    for epoch, start in ((0, 0), (2, 4)):
        for sampler in (whole, *shards):
            sampler.set_position(epoch, start)
        batches = list(whole)
        parts = [list(s) for s in shards]
        assert all(len(p) == len(batches) == whole.batches_per_epoch - start for p in parts)
        for b, batch in enumerate(batches):
            assert sorted(k for p in parts for k in p[b]) == sorted(batch)
            assert [len(p[b]) for p in parts] == [len(batch[r::3]) for r in range(3)]
            assert whole.global_batch_size(start + b) == len(batch)
    assert list(rank_shard(list(range(7)), 1, 3)) == [1, 4]
    assert rank_shard(data := list(range(7)), 0, 1) is data


def test_shards_that_would_leave_a_rank_without_samples_are_refused():
    with pytest.raises(ConfigError, match="global batch"):
        EpochBatchSampler(64, 2, seed=0, rank=0, world_size=4)
    with pytest.raises(ConfigError, match="last batch of each epoch holds 1 of 49"):
        EpochBatchSampler(49, 8, seed=0, rank=1, world_size=2)
    EpochBatchSampler(49, 8, seed=0, rank=1, world_size=2, drop_last=True)
    with pytest.raises(ConfigError, match="outside"):
        EpochBatchSampler(64, 8, seed=0, rank=2, world_size=2)


def test_flags_reach_the_config_and_are_validated():
    from fracfx.cli import build_parser
    from fracfx.cli.train import config_from_args

    args = build_parser().parse_args(["train", "--sync-bn", "--sync-ranges", "--no-stochastic-grad"])
    config = config_from_args(args)
    assert (config.sync_bn, config.sync_ranges, config.stochastic_grad) == (True, True, False)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config_from_args(build_parser().parse_args(["train", "--resume", "x"])) is None  # none given: resume keeps its own
    with pytest.raises(ConfigError, match="sync_bn must be True or False"):
        TrainConfig(sync_bn=1)
    assert TrainConfig.from_dict({k: v for k, v in TrainConfig().to_dict().items() if k not in ("sync_bn", "sync_ranges", "stochastic_grad")}) == TrainConfig()


@needs_fashion
def test_resume_rules_for_data_parallel_checkpoints(tmp_path):
    config = TrainConfig(method="static", arch="tests.train.nets:tiny_cnn", train_subset=32, test_subset=16, batch_size=16,
                         iters=2, eval_every=2, save_folder=str(tmp_path / "run"))
    train(config, progress=False, console=_quiet())
    with pytest.raises(ConfigError, match="already holds a run"):
        open_run(config, None)
    resumed_config, run_dir, state = open_run(config, None, restart_count=1)  # torchrun restarted the job: resume it
    assert run_dir == tmp_path / "run" and state["iteration"] == 2 and resumed_config == config

    path = tmp_path / "run" / "checkpoint.pt"
    state["distributed"] = {"world_size": 2, "ranks": []}
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="written by a run of 2 process.* torchrun with 2 processes in total"):
        train(resume=tmp_path / "run", progress=False, console=_quiet())
