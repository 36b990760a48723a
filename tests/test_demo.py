"""The demo runs end to end: trains, exports, verifies in onnxruntime, and its numbers agree."""

import json

import pytest

from fracfx.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    code = main(["demo", "--arch", "cifar_resnet20", "--iters", "4", "--batch-size", "32", "--test-subset", "256",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["test_samples"] == 256
    assert summary["onnx_contract_met"] is True
    # the ONNX file computes what the fixed-precision PyTorch model computes
    assert abs(summary["accuracy_onnx"] - summary["accuracy_fixed_precision_pytorch"]) <= 100 / 256
    assert 0 < summary["effective_macs_saving_vs_static8"] < 1
    assert (out / "report.png").stat().st_size > 10_000
    # several evaluations (every panel has a curve) and the loss between them
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]
    assert [p for m in metrics for p in m["loss_trace"]][0][0] == 1
    assert (out / "model.onnx").is_file() and (out / "model_int4.onnx").stat().st_size < (out / "model.onnx").stat().st_size
