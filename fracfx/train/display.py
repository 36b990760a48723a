"""What a run prints: a rich live progress bar on a terminal, plain lines otherwise, the summary table."""

from __future__ import annotations

from typing import Any

from fracfx.train.recipe import MethodStatus


def eval_line(record: dict, task) -> str:
    """The line printed at each evaluation."""
    stage = "" if record["stage"] is None else f" stage {record['stage']}"
    b = record["bits"]
    state = record.get("method_state") or {}
    steer = f"  cp {state['cp']:.3f}% (set-point {state['target']:g})" if state.get("cp") is not None and "target" in state else ""
    return (
        f"iter {record['iteration']:>6}  epoch {record['epoch']:.2f}  train loss {record['train_loss']:.4f}  "
        f"{task.score_text(record)}{stage}  bits A{b['act']}/W{b['weight']}/G{b['grad']}{steer}  "
        f"cost {100 * record['cost_vs_sbm']:.1f}% of static 8-bit"
    )


def summary_table(summary: dict, task):
    from rich.table import Table

    table = Table(title=f"fracfx train: {summary['method']} {summary['arch']} on {summary['dataset']}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("iterations", f"{summary['iterations']}"),
        *task.summary_rows(summary),
        ("turning points (iteration)", ", ".join(map(str, summary["turning_points"])) or "-"),
        ("effective MACs", f"{summary['effective_macs']:.4g}"),
        ("vs FP32 training", f"{100 * summary['ratio_vs_fp32']:.2f} %"),
        ("vs static 8-bit training", f"{100 * summary['ratio_vs_sbm']:.2f} %  (saves {100 * summary['savings_vs_sbm']:.1f} %)"),
        ("wall time", f"{summary['elapsed_s']:.0f} s"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


class Display:
    """A rich live progress bar on a terminal; plain lines at each evaluation otherwise."""

    def __init__(self, console, task, total: int, start: int, *, enabled: bool | None, title: str, log_every: int = 0):
        self.console, self.task, self.log_every = console, task, log_every
        self.enabled = console.is_terminal if enabled is None else enabled
        self.total, self.start, self.title = total, start, title
        self.progress = None
        self.last: dict[str, Any] | None = None  # the last evaluation's metrics record

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=self.console, transient=False,
            )
            self.progress.__enter__()
            self.bar = self.progress.add_task(self.title, total=self.total, completed=self.start, status="")
        else:
            self.console.print(f"{self.title}: {self.total} iterations" + (f", resuming at {self.start}" if self.start else ""))
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def update(self, iteration: int, loss: float, train_acc: float, status: MethodStatus, cost: dict) -> None:
        plain = self.progress is None
        if plain and not (self.log_every and iteration % self.log_every == 0):
            return
        line = (f"loss {loss:.3f}  {self.task.live_score(loss, train_acc, self.last)}  {status.label}  "
                f"cost {100 * cost['ratio_vs_sbm']:.0f}% of 8-bit")
        if plain:
            self.console.print(f"iter {iteration:>6}/{self.total}  {line}", highlight=False, soft_wrap=True)
        else:
            self.progress.update(self.bar, completed=iteration, status=line)

    def evaluated(self, record: dict) -> None:
        self.last = record
        (self.progress.console if self.progress is not None else self.console).print(eval_line(record, self.task), highlight=False, soft_wrap=True)
