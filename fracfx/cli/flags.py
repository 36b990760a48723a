"""One flag spelling for every command: hyphens (--batch-size).

add_flag(parser, "--batch-size", ...) adds the flag; a flag with hyphens also answers to its
underscore spelling (--batch_size) for one release, hidden from --help, with a note on stderr
that names the new spelling. Use it for every long option a command declares.
"""

from __future__ import annotations

import argparse
import sys


def add_flag(container, *names: str, **kwargs) -> argparse.Action:
    """container.add_argument(*names, **kwargs), long names spelled with hyphens, plus the hidden old spellings."""
    names = tuple("--" + name[2:].replace("_", "-") if name.startswith("--") else name for name in names)
    action = container.add_argument(*names, **kwargs)
    old = [name.replace("-", "_").replace("__", "--", 1) for name in names if name.startswith("--") and "-" in name[2:]]
    if old:
        preferred = next(name for name in names if name.startswith("--"))
        base = container._registry_get("action", kwargs.get("action"), kwargs.get("action"))
        hidden = {**kwargs, "dest": action.dest, "help": argparse.SUPPRESS, "action": _deprecated(base, preferred)}
        if "default" not in kwargs:
            hidden["default"] = argparse.SUPPRESS  # the visible flag sets the default
        container.add_argument(*old, **hidden)
    return action


def _deprecated(base: type[argparse.Action], preferred: str) -> type[argparse.Action]:
    class Deprecated(base):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{parser.prog}: {option_string} is deprecated and will be removed in the next release; use {preferred}", file=sys.stderr)
            super().__call__(parser, namespace, values, option_string)

    return Deprecated
