"""fracfx.train.loop: the fixed-precision and PFQ recipes end to end on a tiny model, cost
accounting, resume rules and the live display; config and plan in test_config.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from fracfx.errors import CheckpointError, ConfigError
from fracfx.train import TrainConfig, read_metrics, train

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="needs `apt-get install dataset-fashion-mnist`")
TINY = "tests.train.nets:tiny_cnn"


def _config(tmp_path, **changes) -> TrainConfig:
    base = dict(
        arch=TINY, train_subset=96, test_subset=40, batch_size=16, iters=8, eval_every=4, window=1,
        save_folder=str(tmp_path / changes.get("method", "pfq")), seed=1,
    )
    return TrainConfig(**{**base, **changes})


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


# --- the recipes end to end --------------------------------------------------------------------


@needs_fashion
@pytest.mark.parametrize("method", ["fp32", "static", "pfq"])
def test_recipe_runs_and_writes_its_files(tmp_path, method):
    extra = {"initial_threshold": 100.0} if method == "pfq" else {}
    result = train(_config(tmp_path, method=method, **extra), progress=False, console=_quiet())
    run = result.run_dir
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"]
    metrics = read_metrics(run)
    assert [m["iteration"] for m in metrics] == [4, 8]
    last = metrics[-1]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch", "effective_macs", "cost_vs_fp32", "cost_vs_sbm", "timing"):
        assert key in last
    assert 0 <= last["test_acc"] <= 100 and last["epoch"] == pytest.approx(8 / 6)
    assert result.summary["final_test_acc"] == last["test_acc"]
    config = json.loads((run / "config.json").read_text())
    assert config["plan"]["iterations"] == 8 and config["dataset"]["in_channels"] == 1
    if method == "fp32":
        assert last["bits"] == {"act": 32, "weight": 32, "grad": 32} and last["cost_vs_fp32"] == 1.0
        assert last["stage"] is None
    if method == "static":
        assert last["bits"] == {"act": 8, "weight": 8, "grad": 8}
        assert 1.0 < last["cost_vs_sbm"] < 1.2  # the classifier stays FP32 by default
    if method == "pfq":
        # windows of 1 iteration: turning points after windows 5, 10 ... -> iteration 5 only in 8 steps
        assert last["turning_points"] == [5] and [m["stage"] for m in metrics] == [0, 1]
        assert last["bits"] == {"act": 4, "weight": 4, "grad": 6}


@needs_fashion
def test_cost_is_the_sum_of_per_iteration_costs_at_the_bits_in_force(tmp_path):
    import fracfx

    result = train(_config(tmp_path, method="pfq", initial_threshold=100.0), progress=False, console=_quiet())
    model = result.model
    per_sample = {}
    for stage, (a, g) in enumerate([(3, 6), (4, 6)]):
        fracfx.set_bits(model, act_bits=a, weight_bits=a, grad_bits=g)
        per_sample[stage] = fracfx.cost_report(model).effective_macs
    # iterations 1..5 at stage 0 (the switch decided at 5 applies from 6), 6..8 at stage 1; batch 16
    expected = 16 * (5 * per_sample[0] + 3 * per_sample[1])
    assert read_metrics(result.run_dir)[-1]["effective_macs"] == pytest.approx(expected, rel=1e-12)


@needs_fashion
def test_resume_rules(tmp_path):
    config = _config(tmp_path, method="static", iters=4)
    train(config, progress=False, console=_quiet())
    with pytest.raises(ConfigError, match="--resume"):
        train(config, progress=False, console=_quiet())
    with pytest.raises(ConfigError, match="--lr 0.5 differs"):
        train(TrainConfig(method="static", lr=0.5), resume=config.save_folder, progress=False, console=_quiet())
    # resuming a finished run trains nothing more and returns the same metrics
    again = train(None, resume=config.save_folder, progress=False, console=_quiet())
    assert [m["iteration"] for m in again.metrics] == [4]
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(None, resume=tmp_path / "nothing-here", progress=False, console=_quiet())


@needs_fashion
def test_live_progress_on_a_terminal(tmp_path):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160)
    train(_config(tmp_path, method="pfq", iters=3, eval_every=2, initial_threshold=100.0), progress=None, console=console)
    out = buffer.getvalue()
    assert "\x1b[" in out  # rich drew on the (forced) terminal
    for text in ("train acc", "stage 0 FW3/BW6", "of 8-bit", "3/3"):
        assert text in out
