"""`fracfx train` on text (fracfx/train/tasks.py, LanguageModelTask): transformer_lm with each method, perplexity
recomputed from the saved model, per-sequence cost, exact resume after an interruption (in
process) and after SIGKILL (slow), arch/dataset pairing errors, the CLI flags, `fracfx report`
and `fracfx inspect`.

Setup: a word-level corpus written by the test in the wikitext103 layout (about 3,000 tokens,
an 18-token vocabulary), a 1-layer transformer_lm of width 16 with context 8, batch 4, a few
iterations (one thread, tests/conftest.py). The KJV (character level) gets one short run when
the `bible` command is installed.
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import fracfx
from fracfx.errors import ConfigError, FracfxError
from fracfx.runtime.checkpoint import load_checkpoint
from fracfx.data.text import load_corpus
from fracfx.train import TIMING_KEY, TrainConfig, load_trained, read_metrics, train
from tests.train.test_checkpointing import _assert_same_tree, _finish, _launch, _metrics

CONTEXT, D_MODEL, HEADS, BATCH = 8, 16, 2, 4
METHODS = ["fp32", "static", "pfq", "dfq", "fractrain"]
SENTENCES = ["the cat sat on the mat .", "a dog ran to the door .", "the bird sang in the tree .", "a cat saw the dog ."]


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    """wiki.{train,valid,test}.tokens: seeded shuffles of four sentences, one or two per line."""
    folder = tmp_path_factory.mktemp("wikitext")
    rng = random.Random(0)
    for split, lines in (("train", 300), ("valid", 40), ("test", 10)):
        text = "".join(" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 2))) + " \n" for _ in range(lines))
        (folder / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    return folder


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


def _config(folder, wiki, method: str, **changes) -> TrainConfig:
    base = dict(
        method=method, arch="transformer_lm", dataset="wikitext103", datadir=str(wiki), context=CONTEXT, d_model=D_MODEL,
        n_layers=1, n_heads=HEADS, batch_size=BATCH, train_subset=24, iters=6, eval_every=3, window=1,
        optimizer="adam", lr=3e-2, save_folder=str(folder / method), seed=1,
    )
    if method in ("pfq", "fractrain"):
        base["initial_threshold"] = 100.0
    return TrainConfig(**{**base, **changes})


def _valid_nll(model, wiki) -> float:
    """Mean next-token NLL over the validation windows, computed here from the split's token ids."""
    tokens = load_corpus("wikitext103", datadir=wiki).valid
    windows = (len(tokens) - 1) // CONTEXT
    x = torch.stack([tokens[i * CONTEXT:(i + 1) * CONTEXT] for i in range(windows)])
    y = torch.stack([tokens[i * CONTEXT + 1:(i + 1) * CONTEXT + 1] for i in range(windows)])
    with torch.no_grad():
        logits = model.eval()(x)
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_the_lm_and_reports_perplexity(tmp_path, wiki, method):
    result = train(_config(tmp_path, wiki, method, test_batch_size=512), progress=False, console=_quiet())
    metrics = read_metrics(result.run_dir)
    assert [m["iteration"] for m in metrics] == [3, 6]
    for m in metrics:
        assert m["test_ppl"] == pytest.approx(math.exp(m["test_loss"]), rel=1e-12)
        assert m["train_ppl"] == pytest.approx(math.exp(m["train_loss"]), rel=1e-12)
    vocab = load_corpus("wikitext103", datadir=wiki).vocab_size
    assert metrics[-1]["test_ppl"] < 0.9 * vocab  # it learned something: a uniform guess scores the vocabulary size
    summary = result.summary
    assert summary["final_test_ppl"] == metrics[-1]["test_ppl"] and summary["best_test_ppl"] == min(m["test_ppl"] for m in metrics)
    # the saved model, rebuilt from the checkpoint, gives the logged perplexity on the validation split
    loaded = load_trained(result.run_dir)
    assert loaded.example_input.shape == (1, CONTEXT) and loaded.example_input.dtype == torch.int64
    assert math.exp(_valid_nll(loaded.model, wiki)) == pytest.approx(summary["final_test_ppl"], rel=1e-5)
    # cost per sequence of CONTEXT tokens: Q, K, V, proj, fc1, fc2 (12 d^2), QK^T and AV (2 T d), head (d V) per token
    per_sequence = CONTEXT * (12 * D_MODEL**2 + 2 * CONTEXT * D_MODEL + D_MODEL * vocab)
    assert metrics[-1]["fp32_effective_macs"] == pytest.approx(6 * BATCH * 3 * per_sequence, rel=1e-12)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["dataset"]["vocab_size"] == vocab and config["dataset"]["context"] == CONTEXT
    assert config["config"]["keep_fp32"] == ["@last"]  # an LM keeps only its head in FP32, DFQ too
    if method == "static":
        model = result.model
        assert metrics[-1]["effective_macs"] == pytest.approx(6 * BATCH * fracfx.cost_report(model).effective_macs, rel=1e-12)
    if method == "fractrain":
        assert metrics[-1]["turning_points"] == [5] and metrics[-1]["method_state"]["target"] == 2.0


@pytest.mark.skipif(shutil.which("bible") is None, reason="the `bible` command (Debian package bible-kjv) is not installed")
def test_kjv_characters(tmp_path):
    config = TrainConfig(method="fractrain", arch="transformer_lm", dataset="kjv", context=16, d_model=16, n_layers=1, n_heads=2,
                         batch_size=4, train_subset=40, test_subset=8, iters=4, eval_every=2, save_folder=str(tmp_path / "kjv"))
    result = train(config, progress=False, console=_quiet())
    info = json.loads((result.run_dir / "config.json").read_text())["dataset"]
    assert info["level"] == "char" and 40 < info["vocab_size"] < 100 and info["eval_tokens"] == 8 * 16 + 1
    assert math.isfinite(result.summary["final_test_ppl"]) and result.summary["final_test_ppl"] < info["vocab_size"]


def _assert_same_runs(straight, crashed) -> None:
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(crashed / "checkpoint.pt")
    assert a["finished"] and b["finished"] and a["iteration"] == 12
    for key in ("model", "optimizer", "lr_schedule", "method", "cost", "rng", "data", "accumulators"):
        _assert_same_tree(a[key], b[key], key)
    for record in a["metrics"] + b["metrics"]:
        record.pop(TIMING_KEY)
    assert a["metrics"] == b["metrics"] == _metrics(straight) == _metrics(crashed)
    assert a["metrics"][-1]["turning_points"] == [5, 10] and "test_ppl" in a["metrics"][-1]  # 4 epochs of 3 batches (4, 4, 2 windows)


# FracTrain, 10 training windows in batches of 4 (3 batches per epoch), 12 iterations; the
# interruption at iteration 7 comes after the checkpoint at 6, mid-epoch, a turning point behind it.
RESUME = dict(train_subset=10, iters=12, initial_threshold=10.0, lr=1e-2, seed=3)


def test_interrupted_lm_run_resumes_to_identical_weights_and_metrics(tmp_path, wiki, monkeypatch):
    from fracfx.train.session import Session

    straight, crashed = _config(tmp_path / "straight", wiki, "fractrain", **RESUME), _config(tmp_path / "crashed", wiki, "fractrain", **RESUME)
    train(straight, progress=False, console=_quiet())
    step = Session.step

    def interrupted(self, *args):
        if self.iteration == 7:
            raise KeyboardInterrupt  # Ctrl-C in the middle of iteration 8
        return step(self, *args)

    monkeypatch.setattr(Session, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(crashed, progress=False, console=_quiet())
    monkeypatch.setattr(Session, "step", step)
    assert load_checkpoint(f"{crashed.save_folder}/checkpoint.pt")["iteration"] == 6
    train(None, resume=crashed.save_folder, progress=False, console=_quiet())
    _assert_same_runs(tmp_path / "straight" / "fractrain", tmp_path / "crashed" / "fractrain")


@pytest.mark.slow
def test_sigkilled_lm_run_resumes_to_identical_weights_and_metrics(tmp_path, wiki):
    """As tests/train/test_resume.py (its helpers), in `python -m fracfx train` processes; SIGKILL after iteration 7."""
    c = RESUME
    args = ["--method", "fractrain", "--arch", "transformer_lm", "--dataset", "wikitext103", "--datadir", str(wiki),
            "--context", str(CONTEXT), "--d-model", str(D_MODEL), "--n-layers", "1", "--n-heads", str(HEADS),
            "--batch-size", str(BATCH), "--train-subset", str(c["train_subset"]), "--iters", str(c["iters"]), "--eval-every", "3",
            "--window", "1", "--initial-threshold", str(c["initial_threshold"]), "--optimizer", "adam", "--lr", str(c["lr"]),
            "--seed", str(c["seed"]), "--threads", "1", "--no-progress"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    runs = [_launch(straight, args=args), _launch(crashed, args=args, killed_after=7)]
    (straight_rc, straight_out), (crash_rc, crash_out) = [_finish(p) for p in runs]
    assert straight_rc == 0, straight_out
    assert crash_rc == -signal.SIGKILL, crash_out
    assert load_checkpoint(crashed / "checkpoint.pt")["iteration"] == 6
    rc, output = _finish(_launch(crashed, "--resume", str(crashed), args=args))
    assert rc == 0, output
    _assert_same_runs(straight, crashed)


def test_arch_and_dataset_must_fit():
    with pytest.raises(ConfigError, match="use --dataset kjv or wikitext103"):
        TrainConfig(arch="transformer_lm")  # fashion-mnist
    with pytest.raises(ConfigError, match="use --arch transformer_lm"):
        TrainConfig(dataset="kjv")  # cifar_resnet38
    with pytest.raises(ConfigError, match="is an image model"):
        TrainConfig(dataset="wikitext103", arch="resnet18")
    with pytest.raises(ConfigError, match="--context, --n-heads size a language model"):
        TrainConfig(context=64, n_heads=2)
    with pytest.raises(ConfigError, match="d_model must be a positive int"):
        TrainConfig(arch="transformer_lm", dataset="kjv", d_model=0)
    with pytest.raises(ConfigError, match="did you mean 'adam'"):
        TrainConfig(optimizer="adamw")
    lm = dict(arch="transformer_lm", dataset="kjv")
    assert TrainConfig(method="dfq", **lm).keep_fp32 == ("@last",) and TrainConfig(method="dfq", keep_fp32=(), **lm).keep_fp32 == ()
    assert TrainConfig(method="dfq").keep_fp32 is None  # images: each method's own default
    assert TrainConfig(dataset="kjv", arch="my_pkg.nets:lm").arch == "my_pkg.nets:lm"  # a factory is trusted to fit


def test_cli_flags_and_error(capsys):
    from fracfx.cli import build_parser, main
    from fracfx.cli.train import config_from_args

    args = build_parser().parse_args(["train", "--arch", "transformer_lm", "--dataset", "kjv", "--context", "64", "--d-model", "32",
                                      "--n-layers", "3", "--n-heads", "8", "--optimizer", "adam"])
    config = config_from_args(args)
    assert (config.context, config.d_model, config.n_layers, config.n_heads, config.optimizer) == (64, 32, 3, 8, "adam")
    assert main(["train", "--arch", "transformer_lm", "--dataset", "cifar10", "--save-folder", "unused"]) == 2
    assert "language model over token ids" in capsys.readouterr().err


def test_report_and_inspect_show_perplexity(tmp_path, wiki, capsys):
    from fracfx.train.report import load_run, plot_runs, runs_table

    result = train(_config(tmp_path, wiki, "static"), progress=False, console=_quiet())
    out = plot_runs([result.run_dir], tmp_path / "lm.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(file=io.StringIO(), width=200)
    console.print(runs_table([load_run(result.run_dir)]))
    text = console.file.getvalue()
    assert "final valid ppl" in text and f"{result.summary['final_test_ppl']:.3f}" in text
    from fracfx.cli import main

    assert main(["inspect", str(result.run_dir)]) == 0
    assert "validation perplexity at the last evaluation" in capsys.readouterr().out
    image = tmp_path / "image"
    image.mkdir()
    (image / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "test_acc": 50.0}) + "\n")
    with pytest.raises(FracfxError, match="cannot share a plot"):
        runs_table([load_run(result.run_dir), load_run(image)])
