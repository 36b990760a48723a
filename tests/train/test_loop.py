"""fracfx.train: config validation, run planning, the three recipes end to end on a tiny model,
cost accounting, resume rules, the method extension point, the CLI and `fracfx report`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from torch import nn

from fracfx.errors import CheckpointError, ConfigError, FracfxError
from fracfx.train import (
    METHODS, Method, Option, Precision, TrainConfig, plan_run, read_metrics, register_method, train,
)

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="needs `apt-get install dataset-fashion-mnist`")
TINY = "tests.train.test_train:tiny_cnn"


def tiny_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


def _config(tmp_path, **changes) -> TrainConfig:
    base = dict(
        arch=TINY, train_subset=96, test_subset=40, batch_size=16, iters=8, eval_every=4, window=1,
        save_folder=str(tmp_path / changes.get("method", "pfq")), seed=1,
    )
    return TrainConfig(**{**base, **changes})


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


# --- config and plan ---------------------------------------------------------------------------


def test_config_round_trips_and_validates():
    config = TrainConfig(method="static", act_bits=4, lr_milestones=[10, 20], keep_fp32=["@first"])
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="did you mean 'static'"):
        TrainConfig(method="statik")
    with pytest.raises(ConfigError, match="one entry per stage"):
        TrainConfig(num_bits_schedule=(3, 4, 6, 8), num_grad_bits_schedule=(6, 8))
    with pytest.raises(ConfigError, match="iters must be a positive int"):
        TrainConfig(iters=0)
    with pytest.raises(ConfigError, match="increasing"):
        TrainConfig(lr_milestones=(20, 10))
    with pytest.raises(ConfigError, match="act_bits"):
        TrainConfig(act_bits=17)
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        TrainConfig.from_dict({"batchsize": 3})


def test_plan_defaults_follow_the_reference_and_section_9():
    plan = plan_run(TrainConfig(epochs=3), batches_per_epoch=469)
    assert plan.iterations == 1407
    assert plan.lr_milestones == (703, 1055)  # x0.1 at 50 % and 75 %
    assert plan.window == 47  # about iterations / 30
    assert plan.eval_every == 141  # at least 10 evaluations, at least once per epoch
    plan = plan_run(TrainConfig(iters=64000, lr_milestones=(32000, 48000), window=400), batches_per_epoch=391)
    assert (plan.iterations, plan.lr_milestones, plan.window, plan.eval_every) == (64000, (32000, 48000), 400, 391)


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


# --- extension point ---------------------------------------------------------------------------


def test_a_registered_method_gets_its_options_checked():
    @register_method
    class Halves(Method):
        name = "halves-test"
        help = "test method"
        options = (Option("fraction", float, 0.5, "a fraction"),)

        def build(self, model, example_input):
            return model

        def precision(self):
            return Precision(32, 32, 32)

    try:
        assert TrainConfig(method="halves-test").options == {"fraction": 0.5}
        assert TrainConfig(method="halves-test", options={"fraction": 0.25}).options == {"fraction": 0.25}
        with pytest.raises(ConfigError, match="did you mean 'fraction'"):
            TrainConfig(method="halves-test", options={"fractio": 0.25})
        with pytest.raises(ConfigError, match="has no option"):
            TrainConfig(method="pfq", options={"fraction": 0.25})
    finally:
        METHODS.pop("halves-test")


# --- CLI and report ----------------------------------------------------------------------------


def test_cli_takes_reference_and_dashed_flag_names():
    from fracfx.cli import build_parser
    from fracfx.cli.train import config_from_args

    parser = build_parser()
    args = parser.parse_args([
        "train", "--method", "static", "--batch_size", "32", "--weight-bits", "4",
        "--num_bits_schedule", "4", "8", "--num-grad-bits-schedule", "8", "8",
    ])
    config = config_from_args(args)
    assert (config.method, config.batch_size, config.weight_bits) == ("static", 32, 4)
    assert (config.num_bits_schedule, config.num_grad_bits_schedule) == ((4, 8), (8, 8))
    assert config.lr == TrainConfig().lr  # flags not given keep TrainConfig's defaults
    assert config_from_args(parser.parse_args(["train", "--resume", "runs/x"])) is None
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--iters", "5", "--epochs", "2"])


def test_cli_help_mentions_the_methods(capsys):
    from fracfx.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--num_bits_schedule", "--num_grad_bits_schedule", "--window", "--resume", "--lr_milestones", "--keep_fp32"):
        assert flag in out
    assert "--crash_after" not in out


@needs_fashion
def test_cli_train_and_report(tmp_path, capsys):
    from fracfx.cli import main

    run = tmp_path / "cli-run"
    assert main(["train", "--method", "pfq", "--arch", TINY, "--train_subset", "48", "--test_subset", "16", "--batch_size", "16",
                 "--iters", "3", "--window", "1", "--save_folder", str(run), "--no_progress", "--log_every", "2"]) == 0
    out = capsys.readouterr().out
    assert "iter      2/3  loss" in out  # --log_every line
    assert "iter      3" in out and "vs static 8-bit training" in out  # eval line and summary table
    assert main(["report", str(run)]) == 0
    png = run / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert main(["report", str(tmp_path / "absent")]) == 2  # a FracfxError, reported on stderr
    assert "metrics.jsonl" in capsys.readouterr().err


def test_report_overlays_several_runs(tmp_path):
    from fracfx.train.report import load_run, plot_runs

    for name, method, acc in (("a", "static", 80.0), ("b", "pfq", 79.0)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"config": {
            "method": method, "act_bits": 8, "weight_bits": 8, "grad_bits": 8,
            "num_bits_schedule": [3, 4, 6, 8], "num_grad_bits_schedule": [6, 6, 8, 8]}}))
        lines = [{
            "iteration": i, "train_loss": 1.0 / i, "test_loss": 1.2 / i, "test_acc": acc * i / 30, "stage": min(i // 10, 3),
            "bits": {"act": 8, "weight": 8, "grad": 8}, "turning_points": [10, 20][: i // 10], "effective_macs": 1e9 * i,
            "sbm_effective_macs": 2e9 * i, "cost_vs_fp32": 0.03, "cost_vs_sbm": 0.5,
        } for i in (10, 20, 30)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "both.png")
    assert out.stat().st_size > 20_000
    assert "pfq FW 3,4,6,8 / BW 6,6,8,8" in load_run(tmp_path / "b").label
    (tmp_path / "b" / "metrics.jsonl").write_text("")
    with pytest.raises(FracfxError, match="empty"):
        load_run(tmp_path / "b")


@needs_fashion
def test_live_progress_on_a_terminal(tmp_path):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160)
    train(_config(tmp_path, method="pfq", iters=3, eval_every=2, initial_threshold=100.0), progress=None, console=console)
    out = buffer.getvalue()
    assert "\x1b[" in out  # rich drew on the (forced) terminal
    for text in ("train acc", "stage 0 FW3/BW6", "of 8-bit", "3/3"):
        assert text in out
