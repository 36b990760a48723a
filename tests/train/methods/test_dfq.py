"""dfq and fractrain recipes (fracfx/train/methods/dfq.py, fractrain.py): options, a tiny run of each, the DFQ cost
meter against an independent count, exact resume after SIGKILL, report panels, and inspect /
export / model_from_checkpoint on their checkpoints (blocks pinned by passes/pin_candidates).

Setup: CIFAR ResNet-20 on Fashion-MNIST subsets (28x28, 1 channel), batch 16, a few dozen
iterations, one thread. FracTrain gets windows of 2 iterations and a threshold so large that
every full FIFO is a turning point (iterations 10, 20, 30), as the PFQ resume test does.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import fracfx
from fracfx.errors import ConfigError
from fracfx.models import build_model
from fracfx.runtime.checkpoint import load_checkpoint
from fracfx.train import TIMING_KEY, TrainConfig, load_trained, model_from_checkpoint, read_metrics, train
from tests.runtime.test_dfq_controller import force as _force
from tests.train.test_checkpointing import _assert_same_tree, _finish
from tests.train.test_checkpointing import _launch as launch

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="needs `apt-get install dataset-fashion-mnist`")
CIFAR_BITS = {"a3g6": (3, 6), "a4g6": (4, 6), "a4g8": (4, 8), "a6g8": (6, 8), "a6g12": (6, 12)}


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def _config(tmp_path, method: str, **changes) -> TrainConfig:
    base = dict(
        method=method, arch="cifar_resnet20", train_subset=96, test_subset=32, batch_size=16, iters=6, eval_every=3,
        window=1, save_folder=str(tmp_path / method), seed=1,
    )
    if method == "fractrain":
        base["initial_threshold"] = 100.0
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def dfq_run(tmp_path_factory):
    """One tiny dfq run shared by the accounting, report, inspect and export tests."""
    if not FASHION.exists():
        pytest.skip("needs `apt-get install dataset-fashion-mnist`")
    folder = tmp_path_factory.mktemp("dfq")
    return train(_config(folder, "dfq"), progress=False, console=_quiet())


# --- options -----------------------------------------------------------------------------------


def test_options_defaults_and_validation():
    from fracfx.train.methods.dfq import parse_candidates

    dfq, frac = TrainConfig(method="dfq"), TrainConfig(method="fractrain")
    assert dfq.options["weight_bits"] == frac.options["weight_bits"] == 4  # the methods' default weight precision
    assert TrainConfig(method="static").options["weight_bits"] == 8 and TrainConfig(method="dfq", weight_bits=6).options["weight_bits"] == 6
    assert dfq.options == {"target_ratio": 3.0, "beta": 1e-3, "candidates": "3:6,4:6,4:8,6:8,6:12", "relax": 0.0, "error_gain": 0.0, "raise_gain": 0.0,
                           "act_bits": 8, "weight_bits": 4, "grad_bits": 8}
    assert frac.options["target_ratio"] == 1.5 and frac.options["target_ratio_step"] == 0.5 and frac.options["num_turning_point"] == 3
    assert parse_candidates(" 3:6, 4:8,SKIP,fp32") == ((3, 6), (4, 8), "skip", "fp32")
    assert TrainConfig(method="dfq", options={"candidates": "4:8, skip"}).options["candidates"] == "4:8,skip"
    assert TrainConfig.from_dict(json.loads(json.dumps(frac.to_dict()))) == frac
    with pytest.raises(ConfigError, match="not A:G"):
        TrainConfig(method="dfq", options={"candidates": "4-8"})
    with pytest.raises(ConfigError, match="repeats"):
        TrainConfig(method="dfq", options={"candidates": "4:8,4:8"})
    with pytest.raises(ConfigError, match="target_ratio must be a finite number"):
        TrainConfig(method="dfq", options={"target_ratio": -1})
    with pytest.raises(ConfigError, match="did you mean 'target_ratio'"):
        TrainConfig(method="dfq", options={"target_ration": 2.0})


def test_cli_flags_are_shared_between_dfq_and_fractrain():
    from fracfx.cli import build_parser
    from fracfx.cli.train import config_from_args

    parser = build_parser()
    config = config_from_args(parser.parse_args(["train", "--method", "fractrain", "--target-ratio", "2", "--target-ratio-step", "1",
                                                 "--candidates", "3:6,skip", "--window", "5"]))
    assert {k: config.options[k] for k in ("target_ratio", "target_ratio_step", "beta", "candidates", "relax", "weight_bits")} == {
        "target_ratio": 2.0, "target_ratio_step": 1.0, "beta": 1e-3, "candidates": "3:6,skip", "relax": 0.0, "weight_bits": 4}
    assert config.window == 5
    config = config_from_args(parser.parse_args(["train", "--method", "dfq", "--weight-bits", "6", "--beta", "0.01"]))
    assert config.options["weight_bits"] == 6 and config.options["beta"] == 0.01 and config.options["target_ratio"] == 3.0
    with pytest.raises(ConfigError, match="belongs to another method"):
        config_from_args(parser.parse_args(["train", "--method", "dfq", "--target-ratio-step", "1"]))
    with pytest.raises(ConfigError, match="belongs to another method"):
        config_from_args(parser.parse_args(["train", "--method", "static", "--beta", "1"]))


# --- pin_candidates ----------------------------------------------------------------------------


@pytest.mark.parametrize("candidate", [0, 2, 3, 4])  # (3, 6), (6, 12), skip, fp32
def test_pinned_model_computes_what_the_gated_model_computes(candidate):
    from fracfx.nn.mixed import MixedActQuant
    from fracfx.nn.quantizers import ActQuant, GradQuant, WeightQuant
    from fracfx.passes.pin_candidates import gate_choices, pin_candidates

    torch.manual_seed(0)
    example = torch.randn(2, 3, 16, 16)
    gm = fracfx.transform(build_model("cifar_resnet20"), fracfx.DFQConfig(candidates=((3, 6), (4, 8), (6, 12), "skip", "fp32")), example_inputs=example)
    for seed in range(3):  # training forwards set the activation ranges and BN statistics
        gm(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))
    _force(gm, candidate)
    gm.eval()
    tensors = lambda: {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}
    code, state = gm.code, tensors()
    pinned = pin_candidates(gm, choices=dict.fromkeys(gate_choices(gm), candidate))
    assert gm.code == code and all(torch.equal(v, tensors()[k]) for k, v in state.items())  # pure
    assert not [n for n in pinned.graph.nodes if str(n.target).startswith("fracfx_gate")]
    assert not any(isinstance(m, MixedActQuant) for m in pinned.modules())
    acts = [m for m in pinned.modules() if isinstance(m, ActQuant)]
    if candidate == 3:  # skip: block bodies are dead code; the 2 projection shortcuts run on FP32 inputs, as in DFQ
        assert [m.current_bits for m in acts] == [0, 0]
    else:
        assert {m.current_bits for m in acts} == {(3, None, 6, None, 0)[candidate]}
        assert {m.current_bits for m in pinned.modules() if isinstance(m, GradQuant)} == {(6, None, 12, None, 0)[candidate]}
        assert {m.current_bits for m in pinned.modules() if isinstance(m, WeightQuant)} == {0 if candidate == 4 else 4}
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(pinned.eval()(x), gm(x))
    assert fracfx.cost_report(pinned).macs > 0  # a static model: the ordinary tools work on it
    with pytest.raises(ConfigError, match="missing"):
        pin_candidates(gm, choices={0: 1})


# --- a tiny dfq run: files, metrics, cost ------------------------------------------------------


def _block_macs(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, int], dict[str, int]]:
    """MACs per sample from forward hooks: per residual block (layerX.Y) and of the other layers."""
    blocks, others, hooks = {}, {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(m, inputs, out, name=name):
                if isinstance(m, nn.Conv2d):
                    macs = out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                else:
                    macs = m.in_features * m.out_features
                if name.startswith("layer"):
                    block = ".".join(name.split(".")[:2])
                    blocks[block] = blocks.get(block, 0) + macs
                else:
                    others[name] = macs
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(example)
    for h in hooks:
        h.remove()
    return blocks, others


@needs_fashion
def test_dfq_run_writes_its_state_and_meters_each_samples_candidate(dfq_run):
    run = dfq_run.run_dir
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"]
    metrics = read_metrics(run)
    assert [m["iteration"] for m in metrics] == [3, 6]
    state = metrics[-1]["method_state"]
    assert state["target"] == 3.0 and metrics[-1]["stage"] is None and metrics[-1]["turning_points"] == []
    assert state["candidates"] == list(CIFAR_BITS)
    assert all(sum(counts.values()) == 3 * 16 for counts in state["usage"].values())  # 3 iterations of 16 since the last eval
    assert all(sum(counts.values()) == 32 for counts in state["eval_usage"].values())  # the 32 test samples
    assert [p[0] for p in state["cp_trace"]] == [4, 5, 6]  # window = 1: one point per iteration
    from fracfx.train.display import eval_line
    from fracfx.train.tasks import ImageTask

    assert f"cp {state['cp']:.3f}% (set-point 3)" in eval_line(metrics[-1], ImageTask(None))

    # Independent count: per-block MACs from hooks on the float model, bit-ops by the formula,
    # times how many samples used each candidate over the whole run (the controller's counts).
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    usage = checkpoint["method"]["controller"]["usage"]
    labels = checkpoint["method"]["controller"]["labels"]
    blocks, others = _block_macs(build_model("cifar_resnet20", num_classes=10, in_channels=1), torch.zeros(1, 1, 28, 28))
    assert sorted(usage) == sorted(blocks) and sorted(others) == ["conv1", "fc"]  # stem and classifier stay FP32
    w = 4
    gated = sum(
        n * blocks[block] * (a * w + g * w + a * g)
        for block, counts in usage.items() for (a, g), n in zip((CIFAR_BITS[label] for label in labels), counts)
    ) / 1024
    samples = 6 * 16
    ungated = samples * 3 * sum(others.values())
    total_macs = sum(blocks.values()) + sum(others.values())
    summary = dfq_run.summary
    assert summary["effective_macs"] == pytest.approx(gated + ungated, rel=1e-12)
    assert summary["fp32_effective_macs"] == pytest.approx(samples * 3 * total_macs, rel=1e-12)
    assert summary["sbm_effective_macs"] == pytest.approx(samples * 3 * total_macs * 64 / 1024, rel=1e-12)
    assert metrics[-1]["effective_macs"] == summary["effective_macs"]
    # cp: gated bit-ops over FP32's, per batch; equal batches, so its mean over the run is the pooled ratio
    pooled_cp = 100 * gated * 1024 / (samples * 3 * 1024 * sum(blocks.values()))
    assert state["stage_cp"]["0"]["cp"] == pytest.approx(pooled_cp, rel=1e-9)
    assert state["stage_cp"]["0"]["iterations"] == 6
    # the gate network (FP32, trained): embed C->32->16, LSTM 16->16, head 16->5 per block, x3 passes
    width = {"layer1": 16, "layer2": 32, "layer3": 64}
    previous = {"layer1": 16, "layer2": 16, "layer3": 32}  # the first block of a stage reads the previous width
    inputs = [previous[b.split(".")[0]] if b.endswith(".0") else width[b.split(".")[0]] for b in blocks]
    gate = sum(c * 32 + 32 * 16 + 4 * 16 * (16 + 16) + 16 * 5 for c in inputs)
    assert state["gate_effective_macs"] == 3 * gate * samples


def test_dfq_cost_meter_prices_the_masks_of_the_last_forward():
    from fracfx.runtime import DFQController
    from fracfx.runtime.dfq_cost import DFQCostMeter

    example = torch.randn(2, 3, 16, 16)
    gm = fracfx.transform(build_model("cifar_resnet20"), fracfx.DFQConfig(candidates=((3, 6), (6, 12), "skip")), example_inputs=example)
    controller = DFQController(gm, target_ratio=2.0)
    meter = DFQCostMeter(gm, controller)
    with pytest.raises(ConfigError, match="no forward"):
        meter.step(4)
    blocks, others = _block_macs(build_model("cifar_resnet20"), example[:1])
    for index, per_op in ((0, 3 * 4 + 6 * 4 + 3 * 6), (1, 6 * 4 + 12 * 4 + 6 * 12), (2, 0)):
        _force(gm, index)
        gm(torch.randn(4, 3, 16, 16))
        expected = 4 * (sum(blocks.values()) * per_op / 1024 + 3 * sum(others.values()))
        assert meter.step(4) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ConfigError, match="not 5"):
        meter.step(5)
    again = DFQCostMeter(gm, controller)
    again.load_state_dict(json.loads(json.dumps(meter.state_dict())))
    assert again.summary() == meter.summary()
    other = fracfx.transform(build_model("cifar_resnet20"), fracfx.DFQConfig(), example_inputs=torch.randn(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="same model"):
        DFQCostMeter(other, DFQController(other, target_ratio=2.0)).load_state_dict(meter.state_dict())


# --- resume ------------------------------------------------------------------------------------

RESUME_ARGS = [
    "--arch", "cifar_resnet20", "--train-subset", "320", "--test-subset", "48", "--batch-size", "16", "--iters", "24",
    "--eval-every", "8", "--window", "2", "--seed", "3", "--threads", "1", "--no-progress",
    "--candidates", "3:6,4:8,6:12,skip", "--beta", "0.05",
]
CRASH_AT = 19


def _launch(folder: Path, *extra: str, killed_after: int | None = None) -> subprocess.Popen:
    return launch(folder, *extra, args=RESUME_ARGS, killed_after=killed_after)


def _metrics(folder: Path) -> list[dict]:
    lines = read_metrics(folder)
    for line in lines:
        line.pop(TIMING_KEY)
    return lines


@needs_fashion
@pytest.mark.parametrize("method", ["dfq", "fractrain"])
def test_sigkilled_run_resumes_to_identical_weights_controller_scheduler_and_metrics(tmp_path, method):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    extra = ("--method", method, "--target-ratio", "1.5", "--initial-threshold", "10") if method == "fractrain" else ("--method", method, "--target-ratio", "2.6")
    runs = [_launch(straight, *extra), _launch(crashed, *extra, killed_after=CRASH_AT)]
    (rc, out), (crash_rc, crash_out) = [_finish(p) for p in runs]
    assert rc == 0, out
    assert crash_rc == -signal.SIGKILL, crash_out
    interrupted = load_checkpoint(crashed / "checkpoint.pt")
    assert interrupted["iteration"] == 16 and [m["iteration"] for m in _metrics(crashed)] == [8, 16]
    if method == "fractrain":
        assert interrupted["method"]["scheduler"]["tracker"]["turning_points"][0][0] == 10

    rc, output = _finish(_launch(crashed, "--resume", str(crashed)))
    assert rc == 0, output

    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(crashed / "checkpoint.pt")
    assert a["finished"] and b["finished"] and a["iteration"] == b["iteration"] == 24
    for key in ("model", "optimizer", "lr_schedule", "method", "cost", "rng", "data", "accumulators"):
        _assert_same_tree(a[key], b[key], key)
    metrics = _metrics(straight)
    assert metrics == _metrics(crashed)
    for record in a["metrics"] + b["metrics"]:
        record.pop(TIMING_KEY)
    assert a["metrics"] == b["metrics"] == metrics
    states = [m["method_state"] for m in metrics]
    usage = a["method"]["controller"]["usage"]
    assert len({tuple(c) for c in usage.values()}) > 1 or len({i for c in usage.values() for i, n in enumerate(c) if n}) > 1  # choices vary
    assert all(sum(sum(c.values()) for c in s["usage"].values()) == 8 * 16 * len(usage) for s in states)
    if method == "fractrain":
        assert metrics[-1]["turning_points"] == [10, 20] and [m["stage"] for m in metrics] == [0, 1, 2]
        assert [s["target"] for s in states] == [1.5, 2.0, 2.5]
        assert {k: (v["target"], v["iterations"]) for k, v in states[-1]["stage_cp"].items()} == {"0": (1.5, 10), "1": (2.0, 10), "2": (2.5, 4)}
        assert a["method"]["controller"]["target_ratio"] == 2.5
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (straight, crashed)]
    for summary in summaries:
        summary.pop("elapsed_s")
    assert summaries[0] == summaries[1]


# --- report, inspect, export -------------------------------------------------------------------


@needs_fashion
def test_report_draws_cp_and_usage_for_dfq_runs(dfq_run, tmp_path):
    from fracfx.cli import main
    from fracfx.train.report import dfq_usage, load_run

    labels, blocks, usage, test = dfq_usage(load_run(dfq_run.run_dir))
    controller = load_checkpoint(dfq_run.run_dir / "checkpoint.pt")["method"]["controller"]
    assert labels == controller["labels"] and usage == controller["usage"]  # the per-window counts add up to the run's
    assert all(sum(c) == 32 for c in test.values())
    png = tmp_path / "r.png"
    assert main(["report", str(dfq_run.run_dir), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 40_000


@needs_fashion
def test_inspect_shows_the_pinned_model_and_usage_per_block(dfq_run, capsys):
    from fracfx.cli import main

    assert main(["inspect", str(dfq_run.run_dir / "checkpoint.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    dfq = report["run"]["dfq"]
    loaded = load_trained(dfq_run.run_dir)
    assert dfq["pinned"] == loaded.recipe.schedulers["tracking"].pinned_candidates() and set(dfq["pinned"]) == set(dfq["train_usage"])
    for block, counts in dfq["eval_usage"].items():  # pinned = the test set's most used choice
        assert dfq["pinned"][block] == dfq["candidates"][counts.index(max(counts))]
    gated = [row for row in report["ops"] if row["module_path"].startswith("layer")]
    pinned_bits = {row["module_path"]: (row["act_bits"], row["grad_bits"]) for row in gated}
    for path, bits in pinned_bits.items():
        assert bits == CIFAR_BITS[dfq["pinned"][".".join(path.split(".")[:2])]]
    assert report["run"]["iteration"] == 6 and report["run"]["finished"]
    assert main(["inspect", str(dfq_run.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "DFQ candidate usage per block" in out and "layer3.2" in out and "pinned" in out


@needs_fashion
def test_export_from_a_dfq_checkpoint_pins_each_block(dfq_run, tmp_path, capsys):
    from fracfx.cli import main
    from fracfx.export import describe_onnx

    gm, example = model_from_checkpoint(dfq_run.run_dir)
    assert tuple(example.shape) == (1, 1, 28, 28) and not gm.training
    assert not [n for n in gm.graph.nodes if str(n.target).startswith("fracfx_gate")]
    # the pinned model is the DFQ model for samples whose gates choose the pinned candidates
    loaded = load_trained(dfq_run.run_dir)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    usage, blocks = loaded.recipe.schedulers["tracking"], loaded.recipe.state["controller"].blocks
    with torch.no_grad():
        reference = loaded.model(x)
        pinned = usage.pinned_candidates()
        same = torch.stack([b.choice.last_choice == usage.labels.index(pinned[b.name]) for b in blocks]).all(0)
        assert same.any()
        assert torch.equal(gm(x)[same], reference[same])

    out = tmp_path / "dfq.onnx"
    assert main(["export", str(dfq_run.run_dir), "-o", str(out), "--format", "int8", "--verify", "--verify-samples", "16"]) == 0
    assert "export contract" in capsys.readouterr().out
    rows = describe_onnx(out)
    acts = {r.name: r.bits for r in rows if r.role == "act"}
    assert set(acts.values()) == {CIFAR_BITS[label][0] for label in set(pinned.values())}
    assert {r.bits for r in rows if r.role == "weight"} == {4}
    assert main(["export", str(dfq_run.run_dir / "checkpoint.pt"), "-o", str(tmp_path / "b.onnx"), "--format", "int8", "--bits", "8,8"]) == 0
    assert {r.bits for r in describe_onnx(tmp_path / "b.onnx")} == {8}


@needs_fashion
def test_model_from_checkpoint_of_static_and_fp32_runs(tmp_path):
    from fracfx.export import freeze

    for method in ("static", "fp32"):
        result = train(_config(tmp_path, method, arch="tests.train.nets:tiny_cnn", iters=3), progress=False, console=_quiet())
        gm, example = model_from_checkpoint(result.run_dir)
        x = torch.randn(4, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(gm(x), result.model.eval()(x))  # the same trained model, read back
        freeze(gm)  # fixed precision: exportable


@needs_fashion
def test_checkpoints_written_before_the_typed_usage_and_config_version_2_still_load(dfq_run, tmp_path):
    """Earlier DFQ checkpoints: top-level method settings (config version 1), an untyped tracking
    dict, "scheduler": None. They load into the same model and usage."""
    from fracfx.runtime.checkpoint import save_checkpoint

    state = load_checkpoint(dfq_run.run_dir / "checkpoint.pt")
    config = {k: v for k, v in state["config"].items() if k not in ("kind", "version", "options")}
    options = state["config"]["options"]
    state["config"] = {**config, **{k: options[k] for k in ("act_bits", "weight_bits", "grad_bits")},
                       "num_bits_schedule": [3, 4, 6, 8], "num_grad_bits_schedule": [6, 6, 8, 8],
                       "options": {k: options[k] for k in ("target_ratio", "beta", "candidates", "relax")}}
    tracking = {k: v for k, v in state["method"]["tracking"].items() if k not in ("kind", "version")}
    state["method"] = {"controller": state["method"]["controller"], "scheduler": None, "tracking": tracking}
    (tmp_path / "old").mkdir()
    save_checkpoint(tmp_path / "old" / "checkpoint.pt", state)
    old, new = load_trained(tmp_path / "old"), load_trained(dfq_run.run_dir)
    assert old.config == new.config
    assert old.recipe.schedulers["tracking"].state_dict() == new.recipe.schedulers["tracking"].state_dict()
    _assert_same_tree(old.model.state_dict(), new.model.state_dict(), "model")
