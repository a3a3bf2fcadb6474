"""The SageMaker channel reader: a channel folder -> train and valid records.

A channel is a folder with ``manifest.csv`` (made by ``flystage organise``), a manifest CSV
itself, or a folder tree of images read exactly as ``flystage organise`` reads one (the
folder rules :class:`FolderRules`: the hyperparameters ``label_regex``, ``label_level`` and
``group_regex``, turned into :class:`flystage.organise.OrganiseOptions`). No torch: the
records go to :mod:`flystage.training.data`'s cache and dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flystage.errors import FlystageError
from flystage.manifest import ManifestError, Record, read_manifest, sort_labels
from flystage.organise import OrganiseOptions, OrganiseResult, organise, report_lines, summary_table

MANIFEST_NAME = "manifest.csv"


class DataError(FlystageError, ValueError):
    """Training data that cannot be used; the message names the channel or file."""


@dataclass(frozen=True)
class FolderRules:
    """How a folder channel is labelled and grouped: the options of ``flystage organise``
    (:func:`flystage.organise.organise`), given to the training program as the hyperparameters
    ``label_regex``, ``label_level`` and ``group_regex``.

    Without a label option the label is the nearest folder whose name looks like a stage (a
    ``<label>/<images>`` tree of other names: that folder); ``organise`` refuses a guess.
    Without ``group_regex`` every image is its own group, so no validation split is drawn.
    """

    label_regex: str | None = None
    label_level: int | None = None
    group_regex: str | None = None

    def describe(self) -> str:
        if self.label_regex:
            label = f"label_regex {self.label_regex!r}"
        elif self.label_level:
            label = f"label_level {self.label_level}"
        else:
            label = "the nearest stage-like folder"
        group = (
            f"group_regex {self.group_regex!r}"
            if self.group_regex
            else "none (each image its own group)"
        )
        return f"labels from {label}; groups: {group}"

    def is_set(self) -> bool:
        return any(v is not None for v in (self.label_regex, self.label_level, self.group_regex))

    def organise_options(
        self, split: str, fractions: Sequence[float], seed: int
    ) -> OrganiseOptions:
        """These rules as :func:`flystage.organise.organise`'s options (the label pattern and
        every other option at organise's defaults)."""
        return OrganiseOptions(
            label_level=self.label_level,
            label_regex=self.label_regex,
            group_regex=self.group_regex,
            split=split,
            fractions=fractions,
            seed=seed,
        )


NO_GROUP_RULE = (
    "no group rule for the validation split of folder channel {channel}: every image would be "
    "its own group, so copies of one embryo (rotated or augmented images, other shots) could "
    "land in train and in valid and the validation metrics would be measured on leaked images. "
    "Give the group_regex hyperparameter (a regex with a named group 'group' on the path below "
    "the channel, e.g. '^(?P<group>[^/]+)/' for a <gene>/<stage>/ tree), or a manifest made by "
    "`flystage organise --group-regex ...`, or a valid channel"
)


def organise_folder(
    root: str | Path,
    rules: FolderRules = FolderRules(),
    split: str | None = "train",
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.2, 0.0),
) -> OrganiseResult:
    """A folder channel organised by :func:`flystage.organise.organise` with ``rules`` (nested
    folders, stray files and exact duplicates handled there). ``split`` sets every record's
    split; ``None`` splits by group, stratified by ``fractions`` (train, valid, test), with
    ``seed``."""
    options = rules.organise_options(
        split="stratified" if split is None else "none", fractions=fractions, seed=seed
    )
    result = organise([Path(root)], options)
    if split is not None:
        for r in result.records:
            r.split = split
    return result


def records_from_folder(
    root: str | Path,
    split: str | None = "train",
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.2, 0.0),
    rules: FolderRules = FolderRules(),
) -> list[Record]:
    """The records of :func:`organise_folder`."""
    return organise_folder(root, rules, split, seed, fractions).records


def _read_folder(
    channel: Path,
    name: str,
    rules: FolderRules,
    log: Callable[[str], None] | None,
    split: str | None,
    seed: int,
) -> list[Record]:
    result = organise_folder(channel, rules, split=split, seed=seed)
    if log is not None:
        log(f"channel {name}: folder tree {channel}, {rules.describe()}")
        for line in report_lines(result):
            log(f"channel {name}: {line}")
    return result.records


def read_channel(
    channel: str | Path,
    name: str,
    rules: FolderRules = FolderRules(),
    log: Callable[[str], None] | None = None,
    split: str | None = "",
    seed: int = 0,
) -> tuple[list[Record], Path | None]:
    """Every record of a channel folder and its manifest (``None`` for a folder tree).

    A channel is a folder with ``manifest.csv`` (whose ``split`` column says which rows are
    train or valid), a manifest CSV file itself, or a folder tree labelled by ``rules``
    (records get split ``split``: ``""`` leaves it to the caller, None splits by group with
    ``seed`` as ``organise`` does). ``log`` gets what organising a tree left out.
    """
    channel = Path(channel)
    if not channel.exists():
        raise DataError(f"no images in channel {name}: {channel} does not exist")
    manifest = channel if channel.is_file() else channel / MANIFEST_NAME
    try:
        if manifest.is_file():
            return read_manifest(manifest), manifest
        if not any(channel.iterdir()):
            raise DataError(
                f"no images in channel {name}: {channel} is empty (give a {MANIFEST_NAME} or "
                "<label>/<images> folders)"
            )
    except ManifestError as exc:
        raise DataError(f"no usable images in channel {name}: {exc}") from exc
    try:
        return _read_folder(channel, name, rules, log, split=split, seed=seed), None
    except ManifestError as exc:  # the folder rules: ambiguous labels, a group regex that misses
        raise DataError(f"channel {name} ({channel}): {exc}") from exc


def split_channels(
    train_channel: str | Path,
    valid_channel: str | Path | None = None,
    seed: int = 0,
    rules: FolderRules = FolderRules(),
    log: Callable[[str], None] | None = None,
) -> tuple[list[Record], list[Record], Path | None]:
    """Train and valid records from SageMaker channels, and the train manifest (if any).

    - train has a manifest: its ``train`` rows; its ``valid`` rows unless a valid channel is
      given, whose ``valid`` rows (or all rows, if it has none) are used instead.
    - train is a folder tree (labelled and grouped by ``rules``): all of it, with a valid
      channel; without one, a seeded stratified 80/20 split by group, which needs
      ``rules.group_regex`` (refused without: :data:`NO_GROUP_RULE`).
    """
    # A folder tree with a group rule and no valid channel is split as it is organised (once:
    # organising hashes every image).
    split = None if valid_channel is None and rules.group_regex else ""
    train_all, manifest = read_channel(train_channel, "train", rules, log, split=split, seed=seed)
    if manifest is not None and rules.is_set() and log is not None:
        log(
            "note: label_regex/label_level/group_regex not used: channel train has "
            f"{manifest.name} (its labels and groups are used)"
        )
    if manifest is None and valid_channel is None:
        if not rules.group_regex:
            raise DataError(NO_GROUP_RULE.format(channel=train_channel))
        train = [r for r in train_all if r.split == "train"]
        valid = [r for r in train_all if r.split == "valid"]
    else:
        train = [r for r in train_all if r.split in ("train", "")]
        valid = [r for r in train_all if r.split == "valid"]
        if valid_channel is not None:
            valid_all, _ = read_channel(valid_channel, "valid", rules, log)
            valid = [r for r in valid_all if r.split == "valid"] or valid_all
    if not train:
        raise DataError(f"no images in channel train: {train_channel} has no rows with split=train")
    if not valid:
        raise DataError(
            f"no validation images: {train_channel} has no rows with split=valid and no valid "
            "channel was given; organise with a valid fraction or add a valid channel"
        )
    return train, valid, manifest


def data_summary(train: Sequence[Record], valid: Sequence[Record]) -> str:
    """The labels (stage order) and, per split, the images per label and the groups:
    :func:`flystage.organise.summary_table` of the train and valid records."""
    records = [dataclasses.replace(r, split="train") for r in train] + [
        dataclasses.replace(r, split="valid") for r in valid
    ]
    labels = sort_labels(r.label for r in records)
    return f"labels ({len(labels)}): {', '.join(labels)}\n{summary_table(records)}"
