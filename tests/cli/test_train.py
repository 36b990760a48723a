"""`fracfx train` and `fracfx report` on the command line: flags, help, a short run and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fracfx.errors import FracfxError
from fracfx.train import TrainConfig

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="needs `apt-get install dataset-fashion-mnist`")
TINY = "tests.train.nets:tiny_cnn"


def test_cli_takes_hyphen_flags_and_the_old_underscore_spelling_with_a_note(capsys):
    from fracfx.cli import build_parser
    from fracfx.cli.train import config_from_args

    parser = build_parser()
    args = parser.parse_args(["train", "--method", "static", "--batch_size", "32", "--weight-bits", "4"])
    config = config_from_args(args)
    assert (config.method, config.batch_size, config.options["weight_bits"]) == ("static", 32, 4)
    assert "--batch_size is deprecated" in capsys.readouterr().err
    args = parser.parse_args(["train", "--num_bits_schedule", "4", "8", "--num-grad-bits-schedule", "8", "8"])
    config = config_from_args(args)
    assert (config.options["num_bits_schedule"], config.options["num_grad_bits_schedule"]) == ((4, 8), (8, 8))
    assert config.lr == TrainConfig().lr  # flags not given keep TrainConfig's defaults
    assert config_from_args(parser.parse_args(["train", "--resume", "runs/x"])) is None
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--iters", "5", "--epochs", "2"])


def test_cli_help_mentions_the_methods(capsys):
    from fracfx.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--num-bits-schedule", "--num-grad-bits-schedule", "--window", "--resume", "--lr-milestones", "--keep-fp32"):
        assert flag in out
    assert "--crash" not in out and "_" not in " ".join(word for word in out.split() if word.startswith("--"))


@needs_fashion
def test_cli_train_and_report(tmp_path, capsys):
    from fracfx.cli import main

    run = tmp_path / "cli-run"
    assert main(["train", "--method", "pfq", "--arch", TINY, "--train-subset", "48", "--test-subset", "16", "--batch-size", "16",
                 "--iters", "3", "--window", "1", "--save-folder", str(run), "--no-progress", "--log-every", "2"]) == 0
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


