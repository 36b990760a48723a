"""fracfx.cli.flags: one spelling (hyphens) for every flag of every command; the underscore
spelling still works for one release, hidden from --help, with a note on stderr."""

from __future__ import annotations

import argparse

import pytest

from fracfx.cli import build_parser
from fracfx.cli.flags import add_flag

COMMANDS = ("train", "export", "inspect", "report", "demo")


def test_old_spellings_parse_to_the_same_values_with_a_note(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    add_flag(parser, "--batch_size", type=int, default=None)
    add_flag(parser, "--no-progress", action="store_true")
    add_flag(parser, "--keep-fp32", action="append")
    add_flag(parser, "-o", "--output")
    new = parser.parse_args(["--batch-size", "3", "--no-progress", "--keep-fp32", "a", "--keep-fp32", "b", "-o", "x"])
    assert capsys.readouterr().err == ""
    old = parser.parse_args(["--batch_size", "3", "--no_progress", "--keep_fp32", "a", "--keep-fp32", "b", "--output", "x"])
    assert vars(old) == vars(new) == {"batch_size": 3, "no_progress": True, "keep_fp32": ["a", "b"], "output": "x"}
    err = capsys.readouterr().err
    for old_flag, flag in (("--batch_size", "--batch-size"), ("--no_progress", "--no-progress"), ("--keep_fp32", "--keep-fp32")):
        assert f"tool: {old_flag} is deprecated and will be removed in the next release; use {flag}" in err
    assert vars(parser.parse_args([])) == {"batch_size": None, "no_progress": False, "keep_fp32": None, "output": None}


def test_mutually_exclusive_flags_stay_exclusive_in_either_spelling():
    parser = argparse.ArgumentParser(prog="tool")
    group = parser.add_mutually_exclusive_group()
    add_flag(group, "--train-iters", type=int)
    add_flag(group, "--epochs", type=float)
    with pytest.raises(SystemExit):
        parser.parse_args(["--train_iters", "3", "--epochs", "2"])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_shows_hyphen_flags_only(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    flags = [word.strip("[],") for word in capsys.readouterr().out.split() if word.startswith(("--", "[--"))]
    assert flags and not [flag for flag in flags if "_" in flag.split("=")[0]], flags


def test_every_hyphen_flag_of_every_command_also_takes_its_old_spelling():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in COMMANDS:
        options = {s for a in subparsers.choices[command]._actions for s in a.option_strings}
        hyphenated = [s for s in options if s.startswith("--") and "-" in s[2:]]
        for flag in hyphenated:
            assert "--" + flag[2:].replace("-", "_") in options, (command, flag)
