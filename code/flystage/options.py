"""Config dataclasses as command-line options: one option per field, help from field metadata.

No torch: ``flystage train`` / ``crossval`` (``TrainConfig``) and the cloud settings
(``flystage.cloud.settings``) share it. A field documents itself with
``field(default=..., metadata={"help": "..."})``; that one sentence is the option's
``--help`` and its row in the hyperparameters table (``docs/hyperparameters.md``).

Values arrive as SageMaker sends hyperparameters: booleans as ``True``/``"true"``/``1``,
integers possibly as ``"32.0"`` (a tuner), lists as JSON or comma-separated, and a JSON
object hyperparameter as ``key=value,key=value`` (the sagemaker-training toolkit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from flystage.errors import FlystageError


class UsageError(FlystageError, ValueError):
    """A bad argument or hyperparameter."""


class OptionValueError(FlystageError, argparse.ArgumentTypeError, ValueError):
    """A value an option cannot take: argparse shows its message; a ``ValueError`` elsewhere."""


class ArgumentParser(argparse.ArgumentParser):
    # argparse exits on a bad argument; we raise instead, so the failure file gets written.
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"bad argument or hyperparameter: {message}")


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and its one-line help: ``x: int = option(3, "...")``."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_bool(text: str | bool) -> bool:
    """SageMaker sends ``True``/``true``/``"true"``/``1``; argparse's ``type=bool`` would make
    every non-empty string true."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().strip("\"'").lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise OptionValueError(f"expected true or false, not {text!r}")


def json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def regex_text(text: str) -> str | None:
    """A regex hyperparameter: as given, or JSON-decoded when it is a JSON string; empty = none."""
    value = json_or_text(text)
    value = value if isinstance(value, str) else text
    return value or None


def integer(text: str) -> int:
    # A tuner may send an integer as "32.0".
    value = float(text)
    if not value.is_integer():
        raise OptionValueError(f"expected an integer, not {text!r}")
    return int(value)


def mapping(text: str) -> dict[str, Any]:
    """A config as JSON (``{"height": 64}``), or as the SageMaker toolkit passes a JSON object
    hyperparameter on the command line (``height=64,width=160``)."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    if not all(len(pair) == 2 for pair in pairs):
        raise OptionValueError(f"expected JSON or key=value,key=value, not {text!r}")
    return {key.strip(): value.strip() for key, value in pairs}


def argument_type(default: Any) -> Callable[[str], Any]:
    """The parser of an option whose default is ``default`` (its type decides)."""
    if isinstance(default, bool):
        return parse_bool
    if isinstance(default, int):
        return integer
    if isinstance(default, (float, str)):
        return type(default)
    # Tuples and lists: JSON ("[45, 90]") or comma-separated ("45,90").
    return lambda text: (
        tuple(json_or_text(text))
        if str(text).startswith("[")
        else tuple(json_or_text(part) for part in str(text).split(",") if part.strip())
    )


@dataclasses.dataclass(frozen=True)
class Option:
    """One dataclass field as an option: its name, default, one-line help and kind."""

    name: str
    default: Any
    help: str

    @property
    def kind(self) -> str:
        """``bool``, ``int``, ``float``, ``str`` or ``list`` (tuples: JSON or comma-separated)."""
        return "list" if isinstance(self.default, (tuple, list)) else type(self.default).__name__

    @property
    def default_text(self) -> str:
        """The default as a user types it (``true``, ``0.003``, ``180.0``, ``""``)."""
        if isinstance(self.default, bool):
            return str(self.default).lower()
        text = (
            ",".join(map(str, self.default))
            if isinstance(self.default, (tuple, list))
            else str(self.default)
        )
        return text or '""'


def field_options(instance: Any, skip: set[str] = frozenset()) -> Iterator[Option]:
    """The options of a dataclass instance's fields (its values are the defaults), in field
    order, each with the help in its ``metadata["help"]`` (:func:`option`); a field without one
    is an error, so none goes undocumented."""
    for f in dataclasses.fields(instance):
        if f.name in skip:
            continue
        text = f.metadata.get("help")
        if not text:
            raise ValueError(
                f"{type(instance).__name__}.{f.name} has no help: add metadata={{'help': ...}}"
            )
        yield Option(f.name, getattr(instance, f.name), text)


def add_options(group: argparse._ArgumentGroup, options: Iterable[Option]) -> None:
    """``--<name>`` (and its hyphenated alias) per option; the parsed value is None when the
    option is not given (``dataclass_values`` then keeps the default)."""
    for option in options:
        name = option.name
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        text = f"{option.help} (default {option.default_text})".replace(
            "%", "%%"
        )  # argparse %-formats help
        group.add_argument(
            *flags,
            dest=name,
            type=argument_type(option.default),
            default=None,
            metavar=type(option.default).__name__.upper(),
            help=text,
        )


def dataclass_values(
    instance: Any, args: argparse.Namespace, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The field values of ``instance`` (the defaults), then ``given`` (a whole-config JSON
    option), then each single option the command line set."""
    values = dataclasses.asdict(instance)
    for key, value in (given or {}).items():
        # key=value text: typed like the default ("True" -> True, "64" -> 64).
        default = values.get(key)
        values[key] = (
            argument_type(default)(value)
            if isinstance(value, str) and default is not None
            else value
        )
    for f in dataclasses.fields(instance):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return values


def markdown_table(options: Iterable[Option]) -> str:
    """A Markdown table of options: name, kind, default, help."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| hyperparameter | type | default | what it does |", "|---|---|---|---|"]
    rows += [
        f"| `{o.name}` | {o.kind} | `{cell(o.default_text)}` | {cell(o.help)} |" for o in options
    ]
    return "\n".join(rows) + "\n"
