"""`fracfx export`: argument handling and an end-to-end run on a zoo model."""

from __future__ import annotations

import json

import onnx

from fracfx.cli import main


def test_export_zoo_model_with_verify(tmp_path, capsys):
    out = tmp_path / "r20.onnx"
    code = main(["export", "cifar_resnet20", "-o", str(out), "--bits", "4,3", "--format", "int8", "--verify", "--verify-samples", "16", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "int8" and report["frozen_implicitly"] is True
    assert {(q["role"], q["bits"]) for q in report["quantizers"]} == {("act_quant", 4), ("weight_quant", 3)}
    strict = next(level for level in report["verify"]["levels"] if level["level"] == "disable_all")
    assert strict["max_rel_error"] < 1e-4 and strict["top1_agreement"] == 1.0
    assert report["freeze_deviation"]["samples"] == 16
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_default_format_is_int8_fast_on_integer_kernels(tmp_path, capsys):
    out = tmp_path / "r20.onnx"
    code = main(["export", "cifar_resnet20", "-o", str(out), "--bits", "6,4", "--input-size", "16", "--verify", "--verify-samples", "16", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "int8-fast" and report["stats"]["qconv"] > 0
    assert all(level["within_step"] >= 0.999 and level["fused_ops"]["QLinearConv"] > 0 for level in report["verify"]["levels"])


def test_export_prints_summary_and_int4(tmp_path, capsys):
    out = tmp_path / "r20.onnx"
    assert main(["export", "cifar_resnet20", "-o", str(out), "--act-bits", "4", "--weight-bits", "4", "--format", "int4"]) == 0
    text = capsys.readouterr().out
    assert "format int4, opset 21" in text and "zero-point grid" in text and "random batches" in text


def test_bad_bits_are_a_clean_error(tmp_path, capsys):
    assert main(["export", "cifar_resnet20", "-o", str(tmp_path / "x.onnx"), "--bits", "4"]) == 2
    assert "--bits takes A,W" in capsys.readouterr().err


def test_int4_with_wide_weights_is_a_clean_error(tmp_path, capsys):
    assert main(["export", "cifar_resnet20", "-o", str(tmp_path / "x.onnx"), "--bits", "8,8", "--format", "int4"]) == 2
    err = capsys.readouterr().err
    assert "8-bit weights" in err and "format='int8'" in err


def test_checkpoint_path_without_loader_is_explained(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"x")
    code = main(["export", str(checkpoint), "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and str(checkpoint) in err


def test_inspect_lists_the_qdq_quantizers_of_an_exported_file(tmp_path, capsys):
    import json as _json

    from fracfx.cli import main as cli_main

    path = tmp_path / "m.onnx"
    assert cli_main(["export", "cifar_resnet20", "-o", str(path), "--bits", "4,4", "--format", "int8", "--input-size", "16", "--calib-batches", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["inspect", str(path), "--json"]) == 0
    rows = _json.loads(capsys.readouterr().out)
    assert {r["role"] for r in rows} == {"act", "weight"}
    assert all(r["bits"] == 4 and r["scale_min"] > 0 for r in rows)
    from torch import nn

    from fracfx.models import build_model

    convs = sum(isinstance(m, nn.Conv2d) for m in build_model("cifar_resnet20").modules())
    assert sum(r["role"] == "weight" for r in rows) == convs  # every conv; the final fc stays FP32 by default
