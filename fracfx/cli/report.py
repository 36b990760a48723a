"""`fracfx report RUN_DIR [RUN_DIR ...]`: draw training runs as a PNG and print a summary table.

`fracfx report SWEEP_DIR` (a folder of run folders, e.g. RUNS/pfq/seed0 ...): results.csv (one row
per run), summary.csv and summary.md (mean +- std per variant over seeds) and report.png (seeds
shaded) into SWEEP_DIR; see fracfx.train.results. With --publish NAME those files also go to
results/NAME/ and README.md's results block is regenerated (fracfx.train.published).
"""

from __future__ import annotations

from fracfx.cli.flags import add_flag


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="plot training runs: loss, accuracy, precision and cumulative cost vs iteration")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders written by `fracfx train --save-folder` (several overlay), or one sweep folder holding run folders "
                        "(writes results.csv, summary.csv, summary.md, report.png there)")
    add_flag(parser, "-o", "--output", default=None, help="PNG path (default RUN_DIR/report.png of the first run)")
    add_flag(parser, "--publish", default=None, metavar="NAME",
             help="with a sweep folder: also copy its files to results/NAME/ and rewrite README.md's results:NAME block "
                  "(table, picture, verdict per target; run from the repository root); NAME: fmnist or kjv")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from rich.console import Console

    from fracfx.train.report import METRICS, load_run, plot_runs, runs_table

    if len(args.run_dirs) == 1 and Path(args.run_dirs[0]).is_dir() and not (Path(args.run_dirs[0]) / METRICS).is_file():
        from fracfx.train.results import report_sweep

        if args.publish:
            from fracfx.train.published import publish

            paths = publish(args.run_dirs[0], args.publish)
        else:
            paths = report_sweep(args.run_dirs[0], args.output)
        print(paths["summary_md"].read_text(encoding="utf-8"), end="")
        for path in paths.values():
            print(f"wrote {path}")
        if args.publish:
            print("README.md: results block regenerated")
        return 0
    if args.publish:
        from fracfx.errors import ConfigError

        raise ConfigError(f"--publish needs one sweep folder (a folder of run folders, e.g. runs/fmnist_sweep), not {' '.join(args.run_dirs)}")
    output = args.output or str(Path(args.run_dirs[0]) / "report.png")
    path = plot_runs(args.run_dirs, output)
    console = Console()
    console.print(runs_table([load_run(d) for d in args.run_dirs]))
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    return 0
