"""A sweep's results as data and pictures: one row per run, mean +- std per variant over seeds.

    fracfx report runs/fmnist_sweep        # a folder of run folders (any depth): writes there
        results.csv      one row per run: variant, method, seed, final/best score, effective MACs vs
                         FP32 and vs static 8-bit, turning points, per-stage mean cp vs set-point, wall
        summary.csv      one row per variant: mean and std over its seeds of the same numbers
        summary.md       the same as a Markdown table (what the README's results sections quote)
        report.png       curves per variant, the mean line with the seeds' min..max shaded

A run's variant is its folder's parent name when the folder is called seedN (RUNS/pfq/seed0),
else the folder name without a trailing -seedN / _seedN / -sN. The score is test accuracy (images,
higher is better) or validation perplexity (language models, lower is better), chosen from the
metrics as fracfx.train.report does. "vs static 8-bit" in the tables is the variant's mean score
minus (accuracy) or relative to (perplexity) the mean of the variant whose method is `static`
with 8/8/8 bits.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import sys
from pathlib import Path

from fracfx.errors import FracfxError
from fracfx.train.report import DFQ_METHODS, METRICS, Run, _score, load_run

RESULTS_CSV, SUMMARY_CSV, SUMMARY_MD, REPORT_PNG = "results.csv", "summary.csv", "summary.md", "report.png"
ROW_FIELDS = ("variant", "run", "method", "seed", "iterations", "score", "final", "best", "cost_vs_fp32_pct", "cost_vs_sbm_pct",
              "saved_vs_sbm_pct", "cost_vs_sbm_with_gate_pct", "turning_points", "stage_cp", "wall_s")
_SEED_SUFFIX = re.compile(r"^(.*?)[-_](?:seed|s)(\d+)$")


def find_runs(folder: str | os.PathLike) -> list[Path]:
    """Run folders (holding metrics.jsonl) under `folder`, sorted; `folder` itself if it is one."""
    root = Path(folder)
    if (root / METRICS).is_file():
        return [root]
    found = sorted(p.parent for p in root.rglob(METRICS))
    if not found:
        raise FracfxError(f"{root} holds no run folder (no {METRICS} under it); point `fracfx report` at a sweep's folder")
    return found


def variant_of(path: Path) -> tuple[str, int | None]:
    """(variant name, seed from the folder name or None)."""
    match = re.fullmatch(r"seed(\d+)", path.name)
    if match:
        return path.parent.name, int(match.group(1))
    match = _SEED_SUFFIX.match(path.name)
    if match:
        return match.group(1), int(match.group(2))
    return path.name, None


def _option(run: Run, key: str):
    return {**run.config, **(run.config.get("options") or {})}.get(key)


def _stage_cp(run: Run) -> list[tuple[float, float, int]]:
    """Per FracTrain stage (DFQ: the one stage): (mean cp, set-point, iterations)."""
    state = (run.summary or {}).get("stage_cp") or (run.metrics[-1].get("method_state") or {}).get("stage_cp") or {}
    return [(float(v["cp"]), float(v["target"]), int(v["iterations"])) for _, v in sorted(state.items(), key=lambda kv: int(kv[0]))]


def run_row(run: Run) -> dict:
    """One results.csv row (numbers, not text; lists as ';'-joined text)."""
    score = _score([run])
    last = run.metrics[-1]
    variant, folder_seed = variant_of(run.path)
    seed = run.config.get("seed", folder_seed)
    gate = (last.get("method_state") or {}).get("ratio_vs_sbm_with_gate")
    stages = _stage_cp(run)
    return {
        "variant": variant, "run": str(run.path), "method": run.config.get("method"), "seed": seed,
        "iterations": last["iteration"], "score": score.key, "final": last[score.key],
        "best": score.best(m[score.key] for m in run.metrics),
        "cost_vs_fp32_pct": 100 * last["cost_vs_fp32"], "cost_vs_sbm_pct": 100 * last["cost_vs_sbm"],
        "saved_vs_sbm_pct": 100 * (1 - last["cost_vs_sbm"]), "cost_vs_sbm_with_gate_pct": None if gate is None else 100 * gate,
        "turning_points": ",".join(map(str, last.get("turning_points") or [])),
        "stage_cp": ";".join(f"{cp:.3f}/{target:g}" for cp, target, _ in stages),
        "wall_s": (run.summary or {}).get("elapsed_s", (last.get("timing") or {}).get("elapsed_s")),
    }


def _mean_std(values) -> tuple[float | None, float | None]:
    values = [float(v) for v in values if v is not None and v != ""]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _is_static8(run: Run) -> bool:
    return run.config.get("method") == "static" and all(_option(run, k) == 8 for k in ("act_bits", "weight_bits", "grad_bits"))


def summarize(runs: list[Run]) -> list[dict]:
    """One row per variant, in order of first appearance: mean and std over its runs (seeds)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(variant_of(run.path)[0], []).append(run)
    score = _score(runs)
    rows_of = {name: [run_row(r) for r in members] for name, members in groups.items()}
    static = [name for name, members in groups.items() if all(_is_static8(r) for r in members)]
    reference = _mean_std(row["final"] for row in rows_of[static[0]])[0] if static else None
    out = []
    for name, members in groups.items():
        rows = rows_of[name]
        summary = {"variant": name, "method": rows[0]["method"], "seeds": " ".join(str(r["seed"]) for r in rows), "n": len(rows),
                   "score": score.key}
        for key in ("final", "best", "cost_vs_fp32_pct", "cost_vs_sbm_pct", "saved_vs_sbm_pct", "cost_vs_sbm_with_gate_pct", "wall_s"):
            summary[f"{key}_mean"], summary[f"{key}_std"] = _mean_std(r[key] for r in rows)
        if reference is not None and summary["final_mean"] is not None:
            gap = summary["final_mean"] - reference if score.key == "test_acc" else 100 * (summary["final_mean"] / reference - 1)
            summary["vs_static8"] = gap  # accuracy points, or perplexity percent
        else:
            summary["vs_static8"] = None
        summary["turning_points"] = "; ".join(r["turning_points"] or "-" for r in rows)
        stages = [_stage_cp(r) for r in members]
        depth = max((len(s) for s in stages), default=0)
        parts = []
        for index in range(depth):
            cps = [s[index][0] for s in stages if len(s) > index]
            targets = {s[index][1] for s in stages if len(s) > index}
            parts.append(f"{statistics.fmean(cps):.2f}/{'/'.join(f'{t:g}' for t in sorted(targets))}")
        summary["stage_cp"] = "; ".join(parts)
        out.append(summary)
    return out


def _pm(mean, std, digits: int, suffix: str = "") -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} +- {std:.{digits}f}{suffix}"


def markdown_table(summary: list[dict]) -> str:
    """The mean +- std table, Markdown."""
    accuracy = summary and summary[0]["score"] == "test_acc"
    score = "test top-1 (%)" if accuracy else "validation perplexity"
    gap = "vs static 8-bit (points)" if accuracy else "vs static 8-bit (%)"
    digits = 2 if accuracy else 3
    lines = [f"| variant | seeds | final {score} | best {score} | {gap} | effective MACs vs static 8-bit | saved vs static 8-bit "
             "| vs FP32 | turning points (per seed) | mean cp / set-point per stage | wall (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for row in summary:
        gap_text = "-" if row["vs_static8"] is None else f"{row['vs_static8']:+.2f}"
        lines.append(
            f"| {row['variant']} ({row['method']}) | {row['seeds']} | {_pm(row['final_mean'], row['final_std'], digits)} "
            f"| {_pm(row['best_mean'], row['best_std'], digits)} | {gap_text} "
            f"| {_pm(row['cost_vs_sbm_pct_mean'], row['cost_vs_sbm_pct_std'], 1, ' %')} "
            f"| {_pm(row['saved_vs_sbm_pct_mean'], row['saved_vs_sbm_pct_std'], 1, ' %')} "
            f"| {_pm(row['cost_vs_fp32_pct_mean'], row['cost_vs_fp32_pct_std'], 2, ' %')} "
            f"| {row['turning_points']} | {row['stage_cp'] or '-'} | {_pm(row['wall_s_mean'], row['wall_s_std'], 0)} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict], fields) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})


def write_results(runs: list[Run], folder: str | os.PathLike) -> dict[str, Path]:
    """results.csv, summary.csv, summary.md into `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"results": folder / RESULTS_CSV, "summary_csv": folder / SUMMARY_CSV, "summary_md": folder / SUMMARY_MD}
    _write_csv(paths["results"], [run_row(r) for r in runs], ROW_FIELDS)
    summary = summarize(runs)
    _write_csv(paths["summary_csv"], summary, list(summary[0]))
    paths["summary_md"].write_text(markdown_table(summary), encoding="utf-8")
    return paths


def _band(ax, xs, series, color, label, scale=1.0):
    """Mean line, the seeds' min..max shaded (series: one list per seed, same x)."""
    length = min(len(s) for s in series)
    xs = xs[:length]
    columns = [[s[i] * scale for s in series] for i in range(length)]
    mean = [statistics.fmean(c) for c in columns]
    ax.plot(xs, mean, color=color, label=f"{label} (n={len(series)})")
    if len(series) > 1:
        ax.fill_between(xs, [min(c) for c in columns], [max(c) for c in columns], color=color, alpha=0.2, linewidth=0)


def _cp_trace(run: Run) -> list:
    """[iteration, cp, set-point] per indicator window over the whole run: each metrics line holds
    the windows since the evaluation before it."""
    trace = []
    for record in run.metrics:
        part = (record.get("method_state") or {}).get("cp_trace") or []
        trace += json.loads(part) if isinstance(part, str) else part
    return trace


def plot_sweep(runs: list[Run], output: str | os.PathLike) -> Path:
    """Per variant: training loss, score, cumulative cost vs static 8-bit, and (dfq/fractrain) cp vs
    set-point per indicator window; mean over seeds with the seeds' range shaded."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    score = _score(runs)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(variant_of(run.path)[0], []).append(run)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    (ax_loss, ax_score), (ax_cost, ax_cp) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_cp, off_scale = False, []
    for index, (name, members) in enumerate(groups.items()):
        color = colors[index % len(colors)]
        xs = [m["iteration"] for m in members[0].metrics]
        _band(ax_loss, xs, [[m["train_loss"] for m in r.metrics] for r in members], color, name)
        _band(ax_score, xs, [[m[score.key] for m in r.metrics] for r in members], color, name)
        if members[0].config.get("method") == "fp32":  # 16x static 8-bit: drawn, it flattens every quantized curve
            off_scale.append(f"{name} {100 * members[0].metrics[-1]['cost_vs_sbm']:.0f} %")
        else:
            _band(ax_cost, xs, [[m["cost_vs_sbm"] for m in r.metrics] for r in members], color, name, scale=100.0)
        if members[0].config.get("method") in DFQ_METHODS:
            traces = [t for t in (_cp_trace(r) for r in members) if t]
            length = min((len(t) for t in traces), default=0)
            traces = [t[:length] for t in traces]  # seeds of one variant share the windows; trim a shorter (resumed) trace
            if length:
                any_cp = True
                _band(ax_cp, [p[0] for p in traces[0]], [[p[1] for p in t] for t in traces], color, f"{name} cp")
                ax_cp.plot([p[0] for p in traces[0]], [p[2] for p in traces[0]], color=color, linestyle="--", alpha=0.7, drawstyle="steps-mid",
                           label=f"{name} set-point (seed {members[0].config.get('seed')})")
    ax_loss.set(title="training loss (mean since the last evaluation)\nshaded: seeds' range", xlabel="iteration", ylabel="cross-entropy",
                yscale="log")
    ax_score.set(title=f"{score.title}\nshaded: seeds' range", xlabel="iteration", ylabel=score.unit, yscale=score.scale)
    ax_cost.set(title="cumulative effective MACs / static 8-bit's (100 % = static 8/8/8)"
                + (f"\noff the scale: {', '.join(off_scale)}" if off_scale else ""), xlabel="iteration", ylabel="%")
    if any_cp:
        ax_cp.set(title="gated cp (solid, mean over seeds) vs set-point (dashed)", xlabel="iteration (mean per indicator window)", ylabel="cp (% of FP32)")
    else:
        ax_cp.axis("off")
    for ax in axes.flat:
        if ax.has_data():
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def load_sweep(folder: str | os.PathLike) -> list[Run]:
    """The finished runs under `folder` (those with a summary.json).

    A sweep still running has runs that have not evaluated yet (an empty metrics.jsonl) and runs
    part way through their schedule: both are left out with a note on stderr, so the table only
    ever compares whole runs while the rest train.
    """
    runs, waiting, training = [], [], []
    for path in find_runs(folder):
        if not (path / METRICS).read_text(encoding="utf-8").strip():
            waiting.append(path)
            continue
        run = load_run(path)
        (runs if run.summary is not None else training).append(run if run.summary is not None else path)
    for paths, why in ((waiting, "with no evaluation yet"), (training, "still training (no summary.json)")):
        if paths:
            print(f"fracfx report: left out {len(paths)} run(s) {why}: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    if not runs:
        raise FracfxError(f"no run under {folder} has finished yet (reached its first evaluation: {len(training)}); report again later")
    return runs


def report_sweep(folder: str | os.PathLike, output: str | os.PathLike | None = None) -> dict[str, Path]:
    """load_sweep + write_results + plot_sweep; files go into `folder` (the PNG to `output` if given)."""
    runs = load_sweep(folder)
    paths = write_results(runs, folder)
    paths["png"] = plot_sweep(runs, output or Path(folder) / REPORT_PNG)
    return paths


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
