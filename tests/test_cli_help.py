"""CLI conventions (issue 17 item 5): help on every flag, --version, exit codes documented."""

from __future__ import annotations

import argparse

import pytest

from sim import __version__
from sim.cli.main import build_parser, main


def _parsers(parser: argparse.ArgumentParser, name: str = "infersim"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_flag_of_every_subcommand_has_help():
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, parser in _parsers(build_parser())
        for action in parser._actions
        if action.option_strings and not action.help
    ]
    assert not missing, f"flags without help text: {missing}"


def test_the_walk_reaches_every_subcommand():
    names = {name for name, _ in _parsers(build_parser())}
    assert {"infersim simulate", "infersim demo", "infersim kv-memory", "infersim plans",
            "infersim models", "infersim profiles"} <= names


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"infersim {__version__}"


def test_exit_codes_are_in_the_help_epilog(capsys):
    for argv in (["--help"], ["simulate", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "exit codes:" in out
        assert "0  success" in out and "2  a usage or configuration error" in out


def test_a_config_error_exits_2_with_one_line(capsys):
    code = main(["simulate", "--mode", "timing", "--random-range-ratio", "1.0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--random-range-ratio" in err
