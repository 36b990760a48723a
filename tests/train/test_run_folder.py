"""fracfx.train.run_folder: the files of a run folder, written by the main process only."""

from __future__ import annotations

import json

import pytest

from fracfx.errors import CheckpointError
from fracfx.train import TrainConfig, plan_run, read_metrics
from fracfx.train.run_folder import CONFIG, METRICS, RunFolder, resolve_checkpoint


def test_a_run_folder_writes_config_metrics_and_summary(tmp_path):
    folder = RunFolder(tmp_path / "run")
    config = TrainConfig(method="static", act_bits=6)
    folder.start(config, plan_run(config, 10), {"name": "fashion-mnist"}, "help")
    saved = json.loads((tmp_path / "run" / CONFIG).read_text())
    assert TrainConfig.from_dict(saved["config"]) == config and saved["plan"]["iterations"] == 30
    folder.append_metrics({"iteration": 1, "test_acc": 10.0})
    folder.append_metrics({"iteration": 2, "test_acc": float("nan")})
    lines = read_metrics(tmp_path / "run")
    assert [m["iteration"] for m in lines] == [1, 2]
    folder.rewrite_metrics(lines[:1])  # a resumed run drops the lines after its checkpoint
    assert read_metrics(tmp_path / "run") == [{"iteration": 1, "test_acc": 10.0}]
    folder.write_summary({"method": "static"})
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"method": "static"}
    assert read_metrics(tmp_path / "absent") == []


def test_other_ranks_write_nothing(tmp_path):
    folder = RunFolder(tmp_path / "rank1", writes=False)
    folder.append_metrics({"iteration": 1})
    folder.write_summary({})
    assert not (tmp_path / "rank1" / METRICS).exists() and list((tmp_path / "rank1").iterdir()) == []


def test_resolve_checkpoint_takes_a_folder_or_a_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert resolve_checkpoint(tmp_path) == resolve_checkpoint(tmp_path / "checkpoint.pt") == tmp_path / "checkpoint.pt"
