"""Draw training runs (the metrics.jsonl of `fracfx train`) as one PNG.

    plot_runs(["runs/fp32", "runs/static8", "runs/pfq"], "runs/report.png")

Four panels against iteration: training loss and test loss; test accuracy; precision (forward
and gradient bits, with PFQ turning points marked); cumulative effective MACs, with the static
8-bit and FP32 cumulative costs of the same run as reference lines. Several runs overlay, one
colour each. Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from fracfx.errors import FracfxError

METRICS = "metrics.jsonl"


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
        raise FracfxError(f"{path} has no {METRICS}; point `fracfx report` at a folder that `fracfx train --save_folder` wrote")
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
    if method == "static":
        return f"{path.name} (static A{config.get('act_bits')}/W{config.get('weight_bits')}/G{config.get('grad_bits')})"
    if method == "pfq":
        fw = ",".join(map(str, config.get("num_bits_schedule", [])))
        bw = ",".join(map(str, config.get("num_grad_bits_schedule", [])))
        return f"{path.name} (pfq FW {fw} / BW {bw})"
    return f"{path.name} ({method})" if method else path.name


def plot_runs(run_dirs, output: str | os.PathLike) -> Path:
    """Draw the runs into `output` (PNG); returns its path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise FracfxError("give at least one run directory")
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    (ax_loss, ax_acc), (ax_bits, ax_cost) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        color = colors[index % len(colors)]
        it = [m["iteration"] for m in run.metrics]
        ax_loss.plot(it, [m["train_loss"] for m in run.metrics], color=color, label=f"{run.label} train")
        ax_loss.plot(it, [m["test_loss"] for m in run.metrics], color=color, linestyle="--", label=f"{run.label} test")
        ax_acc.plot(it, [m["test_acc"] for m in run.metrics], color=color, marker="o", markersize=3, label=run.label)
        _plot_bits(ax_bits, run, color)
        ax_cost.plot([0, *it], [0, *(m["effective_macs"] for m in run.metrics)], color=color, label=run.label)
        ax_cost.plot([0, *it], [0, *(m["sbm_effective_macs"] for m in run.metrics)], color=color, linestyle=":", alpha=0.6,
                     label=f"{run.label}: static 8-bit")
    ax_loss.set(title="loss (solid: train, mean since the last evaluation; dashed: test)", xlabel="iteration",
                ylabel="cross-entropy", yscale="log")
    ax_acc.set(title="test accuracy", xlabel="iteration", ylabel="%")
    ax_bits.set(title="precision (solid: forward bits, dashed: gradient bits)", xlabel="iteration", ylabel="bits (FP32 = 32)")
    ax_cost.set(title="cumulative training cost (dotted: static 8-bit)", xlabel="iteration", ylabel="effective MACs")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
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
    ax.step(it, [m["bits"]["act"] for m in run.metrics], where="post", color=color, label=f"{run.label} forward")
    ax.step(it, [m["bits"]["grad"] for m in run.metrics], where="post", color=color, linestyle="--", label=f"{run.label} gradient")


def runs_table(runs: list[Run]):
    from rich.table import Table

    table = Table(title="fracfx runs")
    for column in ("run", "iterations", "final test acc", "best test acc", "turning points", "cost vs FP32", "cost vs static 8-bit"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for run in runs:
        last = run.metrics[-1]
        table.add_row(
            run.label, str(last["iteration"]), f"{last['test_acc']:.2f} %", f"{max(m['test_acc'] for m in run.metrics):.2f} %",
            ", ".join(map(str, last.get("turning_points") or [])) or "-",
            f"{100 * last['cost_vs_fp32']:.2f} %", f"{100 * last['cost_vs_sbm']:.1f} %",
        )
    return table
