"""Draw training runs (the metrics.jsonl of `fracfx train`) as one PNG.

    plot_runs(["runs/fp32", "runs/static8", "runs/pfq"], "runs/report.png")

Four panels against iteration: training loss and test loss; test accuracy (language models,
fracfx.train.tasks: validation perplexity); precision (forward and gradient bits, with PFQ
turning points marked); cumulative effective MACs, with the static 8-bit and FP32 cumulative
costs of the same run as reference lines. Several runs overlay, one
colour each. Each dfq/fractrain run adds a row: its cp against the set-point over iterations
(the target steps up at FracTrain's turning points), and the candidate usage per block as
stacked bars (training samples over the whole run, and the last evaluation's test samples).
Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

from fracfx.errors import FracfxError

METRICS = "metrics.jsonl"
DFQ_METHODS = ("dfq", "fractrain")


@dataclasses.dataclass(frozen=True)
class Run:
    path: Path
    label: str
    config: dict
    metrics: list[dict]
    summary: dict | None


def load_run(run_dir: str | os.PathLike) -> Run:
    path = Path(run_dir)
    metrics_path = path / METRICS
    if not metrics_path.is_file():
        raise FracfxError(f"{path} has no {METRICS}; point `fracfx report` at a folder that `fracfx train --save-folder` wrote")
    metrics = []
    for number, line in enumerate(metrics_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise FracfxError(f"{metrics_path}:{number} is not JSON ({error})") from error
    if not metrics:
        raise FracfxError(f"{metrics_path} is empty: the run has not reached its first evaluation yet")
    config = _read_json(path / "config.json").get("config", {})
    summary = _read_json(path / "summary.json") or None
    return Run(path, _label(path, config), config, metrics, summary)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise FracfxError(f"{path} is not JSON ({error})") from error


def _label(path: Path, config: dict) -> str:
    method = config.get("method")
    # the method's settings: config["options"] (config version 2); top-level keys in version 1 run folders
    option = {**config, **(config.get("options") or {})}.get
    if method == "static":
        return f"{path.name} (static A{option('act_bits')}/W{option('weight_bits')}/G{option('grad_bits')})"
    if method == "pfq":
        fw = ",".join(map(str, option("num_bits_schedule") or []))
        bw = ",".join(map(str, option("num_grad_bits_schedule") or []))
        return f"{path.name} (pfq FW {fw} / BW {bw})"
    if method in DFQ_METHODS:
        step = f" +{option('target_ratio_step')}/plateau" if method == "fractrain" else ""
        return f"{path.name} ({method} W{option('weight_bits')} cp target {option('target_ratio')}{step})"
    return f"{path.name} ({method})" if method else path.name


def plot_runs(run_dirs, output: str | os.PathLike) -> Path:
    """Draw the runs into `output` (PNG); returns its path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise FracfxError("give at least one run directory")
    dfq_runs = [run for run in runs if run.config.get("method") in DFQ_METHODS]
    score = _score(runs)
    fig, axes = plt.subplots(2 + len(dfq_runs), 2, figsize=(13, 8.5 + 4.25 * len(dfq_runs)), constrained_layout=True, squeeze=False)
    (ax_loss, ax_acc), (ax_bits, ax_cost) = axes[:2]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        color = colors[index % len(colors)]
        it = [m["iteration"] for m in run.metrics]
        trace = [point for m in run.metrics for point in (m.get("loss_trace") or [])]
        if trace:
            ax_loss.plot([p[0] for p in trace], [p[1] for p in trace], color=color, linewidth=0.8, alpha=0.5,
                         label=f"{run.label} train (every few iterations)")
        ax_loss.plot(it, [m["train_loss"] for m in run.metrics], color=color, marker="o", markersize=3, label=f"{run.label} train")
        ax_loss.plot(it, [m["test_loss"] for m in run.metrics], color=color, linestyle="--", label=f"{run.label} test")
        ax_acc.plot(it, [m[score.key] for m in run.metrics], color=color, marker="o", markersize=3, label=run.label)
        _plot_bits(ax_bits, run, color)
        ax_cost.plot([0, *it], [0, *(m["effective_macs"] for m in run.metrics)], color=color, label=run.label)
        ax_cost.plot([0, *it], [0, *(m["sbm_effective_macs"] for m in run.metrics)], color=color, linestyle=":", alpha=0.6,
                     label=f"{run.label}: static 8-bit")
    ax_loss.set(title="loss (solid: train, mean since the last evaluation; dashed: test)", xlabel="iteration",
                ylabel="cross-entropy", yscale="log")
    ax_acc.set(title=score.title, xlabel="iteration", ylabel=score.unit, yscale=score.scale)
    ax_bits.set(title="precision (solid: forward bits, dashed: gradient bits)", xlabel="iteration", ylabel="bits (FP32 = 32)")
    ax_cost.set(title="cumulative training cost (dotted: static 8-bit)", xlabel="iteration", ylabel="effective MACs")
    for ax in axes[:2].flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for run, (ax_cp, ax_usage) in zip(dfq_runs, axes[2:]):
        _plot_cp(ax_cp, run)
        _plot_usage(ax_usage, run)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _plot_bits(ax, run: Run, color) -> None:
    """Bits as steps; the PFQ schedule is exact between turning points when the config has it."""
    last = run.metrics[-1]
    points = list(last.get("turning_points") or [])
    fw, bw = run.config.get("num_bits_schedule"), run.config.get("num_grad_bits_schedule")
    if run.config.get("method") == "pfq" and fw and bw:
        edges = [0, *points, last["iteration"]]
        xs, act, grad = [], [], []
        for stage in range(len(edges) - 1):
            xs += [edges[stage], edges[stage + 1]]
            act += [fw[stage]] * 2
            grad += [bw[stage]] * 2
        ax.plot(xs, act, color=color, label=f"{run.label} forward")
        ax.plot(xs, grad, color=color, linestyle="--", label=f"{run.label} gradient")
        for point in points:
            ax.axvline(point, color=color, alpha=0.3, linewidth=1)
        return
    it = [m["iteration"] for m in run.metrics]
    # dfq / fractrain: the mean bits the gates ran (marked at each evaluation, so one point shows too)
    ax.step(it, [m["bits"]["act"] for m in run.metrics], where="post", color=color, marker="o", markersize=3, label=f"{run.label} forward")
    ax.step(it, [m["bits"]["grad"] for m in run.metrics], where="post", color=color, linestyle="--", marker="s", markersize=3,
            label=f"{run.label} gradient")


def _dfq_target(run: Run, until: int) -> tuple[list[int], list[float]]:
    """The cp set-point as steps: target_ratio, + target_ratio_step at each FracTrain turning point."""
    options = run.config.get("options", {})
    base, step = float(options.get("target_ratio", 0.0)), float(options.get("target_ratio_step", 0.0))
    points = list(run.metrics[-1].get("turning_points") or []) if run.config.get("method") == "fractrain" else []
    edges = [0, *points, until]
    xs, ys = [], []
    for stage in range(len(edges) - 1):
        xs += [edges[stage], edges[stage + 1]]
        ys += [base + stage * step] * 2
    return xs, ys


def _plot_cp(ax, run: Run) -> None:
    """cp per indicator window (line) and per evaluation window (dots) against the set-point."""
    states = [m.get("method_state") or {} for m in run.metrics]
    trace = [point for state in states for point in state.get("cp_trace", [])]
    if trace:
        ax.plot([p[0] for p in trace], [p[1] for p in trace], color="tab:blue", linewidth=1, label="cp (mean per indicator window)")
    evals = [(m["iteration"], s["cp"]) for m, s in zip(run.metrics, states) if s.get("cp") is not None]
    if evals:
        ax.plot(*zip(*evals), "o", color="tab:blue", markersize=4, label="cp (mean since the previous evaluation)")
    xs, ys = _dfq_target(run, run.metrics[-1]["iteration"])
    ax.plot(xs, ys, color="tab:red", linestyle="--", label="set-point (target_ratio)")
    stages = states[-1].get("stage_cp") or {}
    text = "\n".join(f"stage {k}: mean cp {v['cp']:.3f} vs {v['target']:g} ({v['iterations']} it.)" for k, v in sorted(stages.items(), key=lambda kv: int(kv[0])))
    if text:
        ax.text(0.99, 0.02, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=7, family="monospace",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    ax.set(title=f"{run.path.name} ({run.config.get('method')}): cp vs set-point", xlabel="iteration", ylabel="cp (% of FP32 training cost, gated ops)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def dfq_usage(run: Run) -> tuple[list[str], list[str], dict[str, list[int]], dict[str, list[int]] | None]:
    """(candidates, blocks, training usage over the whole run, last evaluation's test usage) of a DFQ run."""
    states = [m.get("method_state") or {} for m in run.metrics]
    labels = next((s["candidates"] for s in reversed(states) if s.get("candidates")), [])
    blocks: list[str] = []
    train: dict[str, list[int]] = {}
    for state in states:
        for block, counts in (state.get("usage") or {}).items():
            if block not in train:
                blocks.append(block)
                train[block] = [0] * len(labels)
            train[block] = [a + counts.get(label, 0) for a, label in zip(train[block], labels)]
    last = next((s["eval_usage"] for s in reversed(states) if s.get("eval_usage")), None)
    test = None if last is None else {b: [last[b].get(label, 0) for label in labels] for b in blocks if b in last}
    return labels, blocks, train, test


def _plot_usage(ax, run: Run) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    labels, blocks, train, test = dfq_usage(run)
    if not blocks:
        ax.set_visible(False)
        return
    colors = plt.get_cmap("viridis")(np.linspace(0.05, 0.95, len(labels)))
    x = np.arange(len(blocks))
    width = 0.42 if test else 0.8
    for offset, usage, hatch, what in ((-width / 2 if test else 0.0, train, None, "train"), (width / 2, test, "//", "test")):
        if not usage:
            continue
        counts = np.array([usage.get(b, [0] * len(labels)) for b in blocks], dtype=float)
        fractions = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        bottom = np.zeros(len(blocks))
        for k, label in enumerate(labels):
            ax.bar(x + offset, fractions[:, k], width, bottom=bottom, color=colors[k], hatch=hatch, edgecolor="white", linewidth=0.3,
                   label=label if what == "train" else None)
            bottom += fractions[:, k]
    ax.set_xticks(x, blocks, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    which = "left: training samples, whole run; right, hatched: last evaluation, test samples" if test else "training samples, whole run"
    ax.set(title=f"{run.path.name} ({run.config.get('method')}): candidate usage per block\n({which})", ylabel="fraction of samples")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, ncol=len(labels), loc="upper center", bbox_to_anchor=(0.5, -0.28))


@dataclasses.dataclass(frozen=True)
class Score:
    """What the runs are scored by: test accuracy (images) or validation perplexity (language models)."""

    key: str
    title: str
    unit: str
    scale: str
    short: str
    best: Callable  # max for accuracy, min for perplexity

    def text(self, value: float) -> str:
        return f"{value:.2f} %" if self.key == "test_acc" else f"{value:.3f}"


ACCURACY = Score("test_acc", "test accuracy", "%", "linear", "test acc", max)
PERPLEXITY = Score("test_ppl", "validation perplexity (exp of the mean token NLL)", "perplexity", "log", "valid ppl", min)


def _score(runs: list[Run]) -> Score:
    language = [all("test_ppl" in m for m in run.metrics) for run in runs]
    if any(language) and not all(language):
        names = ", ".join(str(run.path) for run, lm in zip(runs, language) if lm)
        raise FracfxError(f"{names}: language-model runs (perplexity) cannot share a plot with image runs (accuracy); report them apart")
    return PERPLEXITY if all(language) else ACCURACY


def runs_table(runs: list[Run]):
    from rich.table import Table

    score = _score(runs)
    table = Table(title="fracfx runs")
    for column in ("run", "iterations", f"final {score.short}", f"best {score.short}", "turning points", "cost vs FP32", "cost vs static 8-bit"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for run in runs:
        last = run.metrics[-1]
        table.add_row(
            run.label, str(last["iteration"]), score.text(last[score.key]), score.text(score.best(m[score.key] for m in run.metrics)),
            ", ".join(map(str, last.get("turning_points") or [])) or "-",
            f"{100 * last['cost_vs_fp32']:.2f} %", f"{100 * last['cost_vs_sbm']:.1f} %",
        )
    return table
