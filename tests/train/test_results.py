"""fracfx.train.results and `fracfx report SWEEP_DIR`: a folder of tiny runs (variants x seeds) ->
results.csv (one row per run), summary.csv / summary.md (mean +- std) and report.png."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
from rich.console import Console

from fracfx.train import TrainConfig, train
from fracfx.train.results import find_runs, report_sweep, variant_of

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="needs `apt-get install dataset-fashion-mnist`")


def _run(folder: Path, seed: int, **changes) -> None:
    base = dict(arch="tests.train.nets:tiny_cnn", train_subset=64, test_subset=32, batch_size=16, iters=8, eval_every=4,
                window=1, save_folder=str(folder), seed=seed)
    train(TrainConfig(**{**base, **changes}), progress=False, console=Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    if not FASHION.exists():
        pytest.skip("needs `apt-get install dataset-fashion-mnist`")
    root = tmp_path_factory.mktemp("sweep")
    for seed in (0, 1):
        _run(root / "static8" / f"seed{seed}", seed, method="static", act_bits=8, weight_bits=8, grad_bits=8)
        _run(root / "pfq" / f"seed{seed}", seed, method="pfq", initial_threshold=100.0)
    _run(root / "fractrain" / "seed0", 0, method="fractrain", arch="cifar_resnet8", iters=6, eval_every=3, initial_threshold=100.0,
         batch_size=8)
    return root


def test_variant_and_seed_from_the_folder_names():
    assert variant_of(Path("runs/pfq/seed2")) == ("pfq", 2)
    assert variant_of(Path("runs/pfq-seed1")) == ("pfq", 1)
    assert variant_of(Path("runs/pfq_s3")) == ("pfq", 3)
    assert variant_of(Path("runs/static8")) == ("static8", None)


@needs_fashion
def test_sweep_report_writes_rows_mean_std_and_a_png(sweep, capsys):
    from fracfx.cli import main

    assert len(find_runs(sweep)) == 5
    assert main(["report", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| static8 (static) | 0 1 |" in out and "wrote" in out
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert [(r["variant"], r["seed"]) for r in rows] == [("fractrain", "0"), ("pfq", "0"), ("pfq", "1"), ("static8", "0"), ("static8", "1")]
    pfq = [r for r in rows if r["variant"] == "pfq"]
    assert all(r["turning_points"] == "5" and r["score"] == "test_acc" for r in pfq)
    assert all(float(r["saved_vs_sbm_pct"]) > 0 for r in pfq)
    for r in pfq:  # the run's own wall time (rounded to 0.1 s in summary.json: a tiny run may take 0.0 s)
        elapsed = json.loads((sweep / "pfq" / f"seed{r['seed']}" / "summary.json").read_text())["elapsed_s"]
        assert float(r["wall_s"]) == pytest.approx(elapsed) and elapsed >= 0
    fractrain = rows[0]
    # per stage: mean cp / set-point (stage 0 at 1.5, stage 1 at 2.0 after the turning point at 5)
    stages = fractrain["stage_cp"].split(";")
    assert [s.split("/")[1] for s in stages] == ["1.5", "2"] and fractrain["cost_vs_sbm_with_gate_pct"]
    summary = {r["variant"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    finals = [float(r["final"]) for r in rows if r["variant"] == "static8"]
    assert float(summary["static8"]["final_mean"]) == pytest.approx(statistics.fmean(finals))
    assert float(summary["static8"]["final_std"]) == pytest.approx(statistics.stdev(finals))
    assert float(summary["static8"]["vs_static8"]) == pytest.approx(0.0)
    pfq_mean = statistics.fmean(float(r["final"]) for r in pfq)
    assert float(summary["pfq"]["vs_static8"]) == pytest.approx(pfq_mean - statistics.fmean(finals))
    assert summary["fractrain"]["n"] == "1" and summary["fractrain"]["stage_cp"].endswith("/2")
    markdown = (sweep / "summary.md").read_text()
    assert markdown.count("\n") == 2 + 3 and " +- " in markdown
    png = (sweep / "report.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 20_000


@needs_fashion
def test_summary_json_holds_seed_and_stage_cp(sweep):
    import json

    summary = json.loads((sweep / "fractrain" / "seed0" / "summary.json").read_text())
    assert summary["seed"] == 0 and set(summary["stage_cp"]) == {"0", "1"}
    assert summary["stage_cp"]["0"]["target"] == 1.5 and summary["stage_cp"]["0"]["iterations"] == 5


@needs_fashion
def test_a_run_without_an_evaluation_yet_is_left_out_with_a_note(sweep, tmp_path, capsys):
    import shutil

    copy = tmp_path / "sweep"
    shutil.copytree(sweep / "static8", copy / "static8")
    (copy / "dfq" / "seed0").mkdir(parents=True)
    (copy / "dfq" / "seed0" / "metrics.jsonl").write_text("")  # started, not yet evaluated
    paths = report_sweep(copy)
    rows = list(csv.DictReader(paths["results"].open()))
    assert [r["variant"] for r in rows] == ["static8", "static8"]
    assert "left out 1 run(s) with no evaluation yet" in capsys.readouterr().err


def test_a_sweep_with_no_evaluation_at_all_says_so(tmp_path):
    from fracfx.errors import FracfxError

    (tmp_path / "pfq" / "seed0").mkdir(parents=True)
    (tmp_path / "pfq" / "seed0" / "metrics.jsonl").write_text("")
    with pytest.raises(FracfxError, match="no run under .* has finished yet"):
        report_sweep(tmp_path)


# --- publishing into results/NAME and the README block ---------------------------------------


def test_verdicts_compare_gap_and_saving_with_the_target():
    from fracfx.train.published import Target, verdict

    image = verdict({"score": "test_acc", "vs_static8": -1.21, "saved_vs_sbm_pct_mean": 44.7, "n": 3}, Target("pfq", 0.5, 40))
    assert "-1.21 points" in image and "score missed by 0.71 points, cost met" in image
    text = verdict({"score": "test_ppl", "vs_static8": 2.0, "saved_vs_sbm_pct_mean": 47.5, "n": 3}, Target("fractrain", 3.0, 50))
    assert "+2.00 %" in text and "score met, cost missed by 2.5 points" in text
    better = verdict({"score": "test_acc", "vs_static8": 0.3, "saved_vs_sbm_pct_mean": 61.0, "n": 1}, Target("fractrain", 0.5, 60))
    assert "score met, cost met" in better and "(1 seed)" in better


def test_the_readme_block_is_replaced_and_nothing_else():
    from fracfx.errors import FracfxError
    from fracfx.train.published import replace_block

    text = "intro\n<!-- results:kjv -->\nold\n<!-- /results:kjv -->\noutro\n"
    assert replace_block(text, "kjv", "new") == "intro\n<!-- results:kjv -->\nnew\n<!-- /results:kjv -->\noutro\n"
    with pytest.raises(FracfxError, match="no '<!-- results:fmnist -->'"):
        replace_block(text, "fmnist", "new")


@needs_fashion
def test_publish_copies_the_files_and_rewrites_the_block(sweep, tmp_path, capsys):
    import shutil

    from fracfx.train.published import publish

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    (copy / "pfq" / "seed1" / "summary.json").unlink()  # a run still training is left out
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# x\n<!-- results:fmnist -->\n<!-- /results:fmnist -->\nrest\n")
    folder = publish(copy, "fmnist", repo=repo)["published"]
    assert "| pfq (pfq) | 0 |" in (folder / "summary.md").read_text()  # the table has the finished runs only
    assert sorted(p.name for p in folder.iterdir()) == ["report.png", "results.csv", "summary.csv", "summary.md"]
    readme = (repo / "README.md").read_text()
    assert readme.startswith("# x\n<!-- results:fmnist -->\nGenerated by") and readme.endswith("<!-- /results:fmnist -->\nrest\n")
    assert "![fmnist sweep](results/fmnist/report.png)" in readme
    assert "- **pfq** (1 seed):" in readme and "- **fractrain** (1 seed):" in readme and "- **fractrain_raise**: not run yet" in readme
    assert "still training" in capsys.readouterr().err
