"""`fracfx inspect`: the rows, totals and FP32 list it prints, as JSON and as tables."""

import json

import pytest

from fracfx.cli import main

RESNET20_CONVS = 21  # stem + 18 block convs + 2 projection shortcuts


def _inspect_json(capsys, *args) -> dict:
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_totals_are_the_sums_of_the_rows_and_8_bit_costs_one_sixteenth(capsys):
    report = _inspect_json(capsys, "cifar_resnet20", "--keep-fp32", "none")
    ops, totals = report["ops"], report["totals"]
    assert len(ops) == RESNET20_CONVS + 1
    assert [op["op"] for op in ops] == ["Conv2d"] * RESNET20_CONVS + ["Linear"]
    assert all(op["quantized"] and (op["act_bits"], op["weight_bits"], op["grad_bits"]) == (8, 8, 8) for op in ops)
    assert totals["macs"] == sum(op["macs"] for op in ops)
    assert totals["effective_macs"] == sum(op["effective_macs"] for op in ops)
    # every op at 8/8/8: (64 + 64 + 64) / (3 * 32 * 32), exactly
    assert totals["ratio_vs_fp32"] == 3 * 64 / 3072
    assert totals["ratio_vs_sbm"] == 1.0
    assert sum(op["share"] for op in ops) == pytest.approx(1.0, abs=1e-12)
    assert report["fp32"] == []
    assert report["config"]["keep_fp32"] == []


def test_json_rows_carry_shapes_and_macs_from_the_traced_graph(capsys):
    report = _inspect_json(capsys, "cifar_resnet20", "--in-channels", "1", "--input-size", "28", "--num-classes", "7")
    assert report["input_shape"] == [1, 1, 28, 28]
    stem, fc = report["ops"][0], report["ops"][-1]
    assert stem["module_path"] == "conv1" and stem["output_shape"] == [1, 16, 28, 28]
    assert stem["macs"] == 16 * 28 * 28 * 1 * 3 * 3
    assert fc["module_path"] == "fc" and fc["output_shape"] == [1, 7] and fc["macs"] == 64 * 7
    # the default keeps the classifier in FP32 and says so
    assert not fc["quantized"] and (fc["act_bits"], fc["weight_bits"], fc["grad_bits"]) == (32, 32, 32)
    assert report["fp32"] == [{"node": "fc", "module_path": "fc", "op": "Linear", "reason": "@last kept FP32"}]


def test_bits_and_globs_reach_the_report(capsys):
    report = _inspect_json(capsys, "cifar_resnet20", "--act-bits", "4", "--grad-bits", "6", "--keep-fp32", "layer3.*", "--keep-fp32", "@first")
    kept = {op["module_path"] for op in report["ops"] if not op["quantized"]}
    assert kept == {"conv1"} | {op["module_path"] for op in report["ops"] if op["module_path"].startswith("layer3.")}
    quantized = [op for op in report["ops"] if op["quantized"]]
    assert quantized and all((op["act_bits"], op["weight_bits"], op["grad_bits"]) == (4, 8, 6) for op in quantized)
    for op in report["ops"]:
        a, w, g = op["act_bits"], op["weight_bits"], op["grad_bits"]
        assert op["effective_macs"] == op["macs"] * (a * w + g * w + a * g) / 1024
    assert {entry["reason"] for entry in report["fp32"]} == {"@first kept FP32", "keep_fp32 glob 'layer3.*'"}


def test_table_shows_rows_totals_and_what_stays_fp32(capsys):
    assert main(["inspect", "cifar_resnet20", "--keep-fp32", "@first", "--keep-fp32", "@last"]) == 0
    out = capsys.readouterr().out
    assert "cifar_resnet20: compute ops for one 3x32x32 sample" in out
    assert "layer3.0.downsample.0" in out and "8/8/8" in out
    assert "total (22 ops)" in out and "40.81M" in out
    assert "vs FP32 training" in out and "vs static 8-bit training" in out
    assert "stays FP32" in out and "@first kept FP32" in out and "@last kept FP32" in out


def test_table_says_when_nothing_stays_fp32(capsys):
    assert main(["inspect", "cifar_resnet20", "--keep-fp32", "none"]) == 0
    out = capsys.readouterr().out
    assert "6.250 %" in out and "100.000 %" in out
    assert "Nothing stays FP32" in out


def test_torchvision_and_factory_models(capsys):
    report = _inspect_json(capsys, "vit_b_16", "--input-size", "32")
    assert any(op["quantized"] and op["op"] == "Conv2d" for op in report["ops"])  # the patch embedding
    attention = [op for op in report["ops"] if op["module_path"] == "encoder.layers.encoder_layer_0.self_attention"]
    assert [op["kind"] for op in attention] == ["linear"] * 3 + ["matmul"] * 2 + ["linear"]  # Q K V, QK^T, AV, out
    assert all(op["quantized"] for op in attention)
    opaque = _inspect_json(capsys, "vit_b_16", "--input-size", "32", "--leaf", "MultiheadAttention")
    assert sum(entry["op"] == "MultiheadAttention" for entry in opaque["fp32"]) == 12
    assert len(opaque["ops"]) == len(report["ops"]) - 12 * 6
    report = _inspect_json(capsys, "tests.models.test_zoo:tiny_net", "--input-size", "8", "--keep-fp32", "none")
    assert [op["op"] for op in report["ops"]] == ["Conv2d", "Linear"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["cifar_resnet39"], "did you mean 'cifar_resnet38'"),
        (["cifar_resnet20", "--act-bits", "17"], "act_bits=17 is outside 1..16"),
        (["cifar_resnet20", "--keep-fp32", "none", "--keep-fp32", "@first"], "cannot be combined"),
    ],
)
def test_user_errors_exit_2_with_the_fix(capsys, args, message):
    assert main(["inspect", *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_input_size_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "cifar_resnet20", "--input-size", "32x"])
    assert info.value.code == 2
    assert "expected H or HxW" in capsys.readouterr().err
