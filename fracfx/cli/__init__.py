"""The `fracfx` command line: argparse -> config -> api. No logic of its own.

Each subcommand lives in fracfx/cli/<name>.py (inspect, train, report, export, bench, demo) and
exposes `register(subparsers) -> None`, which adds its parser and sets `func(args) -> int`;
flags.py gives every command the same flag spelling (--batch-size).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fracfx.cpu_memory import reuse_freed_memory
from fracfx.errors import FracfxError

COMMANDS = ("inspect", "train", "report", "export", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fracfx", description="FracTrain as torch.fx passes: inspect, train, export.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fracfx.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"fracfx.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Training, benchmarks and exports allocate step-sized tensors over and over: keep freed
    # memory in the process (fracfx/cpu_memory.py says why and what it measured).
    reuse_freed_memory()
    try:
        return int(args.func(args) or 0)
    except FracfxError as error:
        print(f"fracfx {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
