"""Command tables: one shape (name -> (handler, help)) for flystage, cloud and local."""

from __future__ import annotations

import argparse

import pytest

from flystage import cli
from flystage.cloud import command as cloud_command
from flystage.subcommands import add_subcommands
from flystage_local import command as local_command


def test_add_subcommands_makes_one_required_parser_per_entry(capsys) -> None:
    table = {"one": (lambda args: 1, "the first"), "two": (lambda args: 2, "the second")}
    parser = argparse.ArgumentParser(prog="x")
    parsers = add_subcommands(parser, table, "which", "WHICH")
    assert list(parsers) == ["one", "two"]
    assert parsers["two"].description == "the second"
    parsers["two"].add_argument("--n", type=int, default=0)
    args = parser.parse_args(["two", "--n", "3"])
    assert (args.which, args.n) == ("two", 3)
    assert table[args.which][0](args) == 2
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([])
    assert exit_info.value.code == 2 and "WHICH" in capsys.readouterr().err


@pytest.mark.parametrize(
    "table, parser_of, dest",
    [
        (cloud_command.TARGETS, lambda: cli.build_parser("cloud"), "target"),
        (local_command.COMMANDS, local_command.parser, "local_command"),
    ],
)
def test_cloud_and_local_dispatch_by_their_table(table, parser_of, dest) -> None:
    assert all(callable(handler) and isinstance(text, str) for handler, text in table.values())
    parser = parser_of()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if dest == "target":  # flystage -> cloud -> target
        sub = next(
            a for a in sub.choices["cloud"]._actions if isinstance(a, argparse._SubParsersAction)
        )
    assert sub.dest == dest and list(sub.choices) == list(table)


def test_local_run_calls_the_handler_of_its_table(monkeypatch) -> None:
    seen = []
    monkeypatch.setitem(
        local_command.COMMANDS, "stop", (lambda args: seen.append(args) or 7, "stub")
    )
    args = local_command.parser().parse_args(["stop"])
    assert local_command.run(args) == 7 and seen == [args]
