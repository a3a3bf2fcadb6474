"""Sub-command tables: ``name -> (handler, one-line help)``, one shape for every command line.

``flystage`` itself (``cli.COMMANDS``, with a module name for the handler so that it is
imported only when its command runs), ``flystage cloud`` and ``flystage local`` each keep
such a table; dispatching is ``table[name][0](...)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

# name -> (handler, or the module that holds it; one-line help)
Table = Mapping[str, tuple[Any, str]]


def add_subcommands(
    parser: argparse.ArgumentParser, table: Table, dest: str, metavar: str
) -> dict[str, argparse.ArgumentParser]:
    """One required sub-parser per entry of ``table`` (its help also its description), the
    chosen name in ``args.<dest>``; returns them by name for their own options."""
    sub = parser.add_subparsers(dest=dest, metavar=metavar)
    sub.required = True
    return {
        name: sub.add_parser(name, help=text, description=text) for name, (_, text) in table.items()
    }
