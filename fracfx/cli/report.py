"""`fracfx report RUN_DIR [RUN_DIR ...]`: draw training runs as a PNG and print a summary table."""

from __future__ import annotations

from fracfx.cli.flags import add_flag


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="plot training runs: loss, accuracy, precision and cumulative cost vs iteration")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders written by `fracfx train --save-folder` (several overlay)")
    add_flag(parser, "-o", "--output", default=None, help="PNG path (default RUN_DIR/report.png of the first run)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from rich.console import Console

    from fracfx.train.report import load_run, plot_runs, runs_table

    output = args.output or str(Path(args.run_dirs[0]) / "report.png")
    path = plot_runs(args.run_dirs, output)
    console = Console()
    console.print(runs_table([load_run(d) for d in args.run_dirs]))
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    return 0
