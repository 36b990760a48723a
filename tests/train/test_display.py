"""fracfx.train.display: the evaluation line, the live status and the summary table, each
showing the task's own score (accuracy for images, perplexity for language models)."""

from __future__ import annotations

import io
import types

from rich.console import Console

from fracfx.train.display import Display, eval_line, summary_table
from fracfx.train.recipe import MethodStatus
from fracfx.train.tasks import ImageTask, LanguageModelTask

RECORD = {"iteration": 8, "epoch": 0.5, "train_loss": 1.25, "test_acc": 61.5, "stage": 1, "bits": {"act": 4, "weight": 4, "grad": 6},
          "method_state": {}, "cost_vs_sbm": 0.42, "train_ppl": 3.49, "test_ppl": 4.125}
SUMMARY = {"method": "pfq", "arch": "a", "dataset": "d", "iterations": 8, "final_test_acc": 61.5, "best_test_acc": 62.0,
           "turning_points": [5], "effective_macs": 1e9, "ratio_vs_fp32": 0.03, "ratio_vs_sbm": 0.42, "savings_vs_sbm": 0.58,
           "elapsed_s": 3.0}
LM = LanguageModelTask(types.SimpleNamespace(context=8))


def _text(renderable) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(renderable)
    return console.file.getvalue()


def test_the_evaluation_line_shows_the_tasks_score():
    assert "test acc 61.50% stage 1  bits A4/W4/G6  cost 42.0% of static 8-bit" in eval_line(RECORD, ImageTask(None))
    line = eval_line(RECORD, LM)
    assert "train ppl 3.490  valid ppl 4.125 stage 1" in line and "test acc" not in line
    dfq = dict(RECORD, method_state={"cp": 2.5, "target": 3.0})
    assert "cp 2.500% (set-point 3)" in eval_line(dfq, ImageTask(None))


def test_the_summary_table_shows_the_tasks_rows():
    image = _text(summary_table(SUMMARY, ImageTask(None)))
    assert "final test accuracy" in image and "61.50 %" in image and "saves 58.0 %" in image
    lm = _text(summary_table(dict(SUMMARY, final_test_ppl=4.125, best_test_ppl=4.0, final_train_ppl=3.5), LM))
    assert "final validation perplexity" in lm and "4.125" in lm and "test accuracy" not in lm


def test_plain_progress_lines_every_log_every_iterations():
    console = Console(file=io.StringIO(), width=200)
    status = MethodStatus(4, 4, 6, stage=1)
    with Display(console, LM, total=4, start=0, enabled=False, title="run", log_every=2) as display:
        for iteration in (1, 2):
            display.update(iteration, 1.0, 50.0, status, {"ratio_vs_sbm": 0.5})
        display.evaluated(RECORD)
        display.update(4, 1.0, 50.0, status, {"ratio_vs_sbm": 0.5})
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "run: 4 iterations"
    assert lines[1] == "iter      2/4  loss 1.000  ppl 2.718  stage 1 FW4/BW6  cost 50% of 8-bit"
    assert lines[3].endswith("valid ppl 4.125  stage 1 FW4/BW6  cost 50% of 8-bit")
    assert MethodStatus(32, 32, 32).label == "FP32"
    assert MethodStatus(3.5, 4, 6.25, stage=0, setpoint=(2.5, 3.0)).label == "stage 0 cp 2.50% (set-point 3) A3.5/W4/G6.25"
