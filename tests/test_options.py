"""Config dataclasses as options: every hyperparameter explains itself, once, and the docs'
table is the one the code generates."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from flystage.options import (
    ArgumentParser,
    Option,
    add_options,
    dataclass_values,
    field_options,
    option,
    parse_bool,
)
from flystage.training.config import hyperparameters_markdown, option_groups
from flystage.training.train import configure_parser

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "hyperparameters.md"
BEGIN, END = (
    "<!-- BEGIN generated: flystage.training.config.hyperparameters_markdown() -->\n",
    "<!-- END generated -->",
)


def test_the_docs_table_is_the_generated_one() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"{DOC} lost its generated-table markers"
    in_doc = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert in_doc == hyperparameters_markdown(), (
        f"{DOC} is out of date: replace the text between its markers with the output of "
        "`python -c 'from flystage.training.config import hyperparameters_markdown as m; "
        'print(m(), end="")\'`'
    )


def test_every_training_option_has_a_help_of_its_own() -> None:
    groups = option_groups()
    assert [title for title, _, _ in groups] == [
        "training hyperparameters",
        "preprocessing",
        "augmentation",
    ]
    names = [o.name for _, _, options in groups for o in options]
    assert len(names) == len(set(names)) > 50
    for _, _, options in groups:
        for o in options:
            assert len(o.help) >= 15 and not o.help.startswith("default"), o
            assert "\n" not in o.help, o
    parser = ArgumentParser()
    configure_parser(parser)
    text = parser.format_help()
    assert "probe: L2 penalty on the linear head's weights" in text and "(default 1.0)" in text
    assert not re.search(
        r"^\s+--\S+ \S+\s+default ", text, re.M
    )  # no option whose help is only its default


def test_a_field_without_help_is_refused() -> None:
    @dataclasses.dataclass
    class Config:
        documented: int = option(3, "a documented number")
        bare: float = 0.5

    with pytest.raises(ValueError, match="Config.bare has no help"):
        list(field_options(Config()))


def test_options_parse_as_sagemaker_sends_them() -> None:
    @dataclasses.dataclass
    class Config:
        count: int = option(3, "a count")
        flag: bool = option(False, "a flag")
        angles: tuple[float, ...] = option((180.0,), "angles")
        name: str = option("", "a name")

    parser = ArgumentParser()
    add_options(parser.add_argument_group("config"), field_options(Config()))
    args = parser.parse_args(["--count", "32.0", "--flag", '"true"', "--angles", "45,90"])
    assert Config(**dataclass_values(Config(), args)) == Config(32, True, (45, 90), "")
    given = dataclass_values(Config(), parser.parse_args([]), {"count": "7", "flag": "False"})
    assert (given["count"], given["flag"]) == (7, False)
    with pytest.raises(Exception, match="expected an integer"):
        parser.parse_args(["--count", "3.5"])
    assert [Option("x", v, "h").default_text for v in (True, 0.5, (), "", (1, 2))] == [
        "true",
        "0.5",
        '""',
        '""',
        "1,2",
    ]


def test_one_bool_parser_for_hyperparameters_and_cloud_settings(tmp_path: Path) -> None:
    from flystage.cloud.settings import CloudError, load_settings

    (tmp_path / "none.toml").write_text("")
    for text, value in [("on", True), ("0", False), ("YES", True)]:
        assert parse_bool(text) is value
        assert (
            load_settings(
                tmp_path / "none.toml", {"FLYSTAGE_SPOT": text, "FLYSTAGE_MAX_WAIT_S": "99999"}
            ).spot
            is value
        )
    assert (
        load_settings(tmp_path / "none.toml", {"FLYSTAGE_SPOT": ""}).spot is False
    )  # empty = off, as before
    with pytest.raises(CloudError, match="is not a valid bool"):
        load_settings(tmp_path / "none.toml", {"FLYSTAGE_SPOT": "maybe"})
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bool("maybe")
