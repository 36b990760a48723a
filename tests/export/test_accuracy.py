"""`fracfx export RUN --test-accuracy`: the run's test set through the trained model, the
fixed-precision model and onnxruntime, each number checked against an independent count."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from rich.console import Console

from fracfx.cli import main
from fracfx.data import build_loaders
from fracfx.train import TrainConfig, load_trained, train

FASHION = Path("/usr/share/datasets/fashion-mnist")
TEST_IMAGES = 64


@pytest.fixture(scope="module")
def static_run(tmp_path_factory):
    if not FASHION.exists():
        pytest.skip("needs `apt-get install dataset-fashion-mnist`")
    folder = tmp_path_factory.mktemp("static")
    config = TrainConfig(method="static", arch="cifar_resnet20", train_subset=96, test_subset=32, batch_size=16, iters=6,
                         eval_every=6, save_folder=str(folder / "run"), seed=1)
    return train(config, progress=False, console=Console(file=io.StringIO())).run_dir


def _images_and_labels():
    _, loader, _ = build_loaders("fashion-mnist", batch_size=256, seed=1, test_subset=TEST_IMAGES)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def test_reports_what_each_model_gets_right(static_run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = main(["export", str(static_run), "-o", str(out), "--format", "int8", "--test-accuracy", "--test-subset", str(TEST_IMAGES),
                 "--json"])
    assert code == 0
    accuracy = json.loads(capsys.readouterr().out)["test_accuracy"]
    assert accuracy["samples"] == TEST_IMAGES

    images, labels = _images_and_labels()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    onnx_correct = int((logits.argmax(1) == labels.numpy()).sum())
    assert accuracy["onnx"]["disable_all"] == pytest.approx(100 * onnx_correct / TEST_IMAGES)

    with torch.no_grad():
        trained_correct = int((load_trained(static_run).model(images).argmax(1) == labels).sum())
    assert accuracy["trained"] == pytest.approx(100 * trained_correct / TEST_IMAGES)
    # the exact format computes what the fixed-precision model computes, on these images too
    assert accuracy["fixed_precision"] == accuracy["onnx"]["disable_all"]
    assert np.isfinite(logits).all()


def test_model_name_is_refused_with_the_fix(tmp_path, capsys):
    assert main(["export", "cifar_resnet20", "-o", str(tmp_path / "x.onnx"), "--test-accuracy"]) == 2
    assert "pass a run folder or checkpoint.pt" in capsys.readouterr().err


def test_run_inputs_are_the_runs_own_images(static_run):
    from fracfx.export.accuracy import run_inputs

    train_batch = run_inputs(static_run, 24)
    assert train_batch.shape == (24, 1, 28, 28) and torch.equal(train_batch, run_inputs(static_run, 24))  # the same every call
    images, _ = _images_and_labels()  # independent: the test loader built here
    assert torch.equal(run_inputs(static_run, 16, split="test"), images[:16])


def test_fast_export_of_a_run_is_calibrated_on_its_training_images(static_run, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    from fracfx.export.accuracy import CALIBRATION_IMAGES, run_inputs
    from fracfx.export.fast_int8 import export_fast
    from fracfx.train import model_from_checkpoint

    out = tmp_path / "cli.onnx"
    assert main(["export", str(static_run), "-o", str(out), "--format", "int8-fast"]) == 0
    capsys.readouterr()
    gm, example = model_from_checkpoint(static_run)
    export_fast(gm, tmp_path / "calibrated.onnx", example, calibration_inputs=run_inputs(static_run, CALIBRATION_IMAGES))
    export_fast(gm, tmp_path / "plain.onnx", example)

    def weights(path):
        return [numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer if t.data_type == onnx.TensorProto.INT8]

    cli, calibrated, plain = (weights(p) for p in (out, tmp_path / "calibrated.onnx", tmp_path / "plain.onnx"))
    assert all(np.array_equal(a, b) for a, b in zip(cli, calibrated)) and len(cli) == len(calibrated)
    assert not all(np.array_equal(a, b) for a, b in zip(cli, plain))  # 8-bit weights: re-quantized channels rounded on data



def test_fast_export_of_a_run_whose_data_is_missing_still_writes_the_file(static_run, tmp_path, capsys, monkeypatch):
    from fracfx.data import images

    monkeypatch.setattr(images, "FASHION_MNIST_DIR", str(tmp_path / "no_such_data"))  # the run moved to a machine without its dataset
    out = tmp_path / "m.onnx"
    assert main(["export", str(static_run), "-o", str(out), "--format", "int8-fast"]) == 0
    err = capsys.readouterr().err
    assert "exporting without calibration on the run's training data" in err and "no_such_data" in err
    assert out.exists() and out.stat().st_size > 0
