"""Cross-validation folds: which groups each fold holds out, trains and validates on.

:func:`make_folds` holds out one group per fold (leave-one-group-out); with many groups
:func:`make_kfolds` makes ``k`` folds of whole groups, stratified by label, so that every fold
tests every stage in the same proportions. Each fold's validation set (for early stopping) is
made of whole *training* groups (:func:`inner_validation_groups`; per label for k folds),
never of held-out groups.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from flystage.errors import FlystageError
from flystage.manifest import Record, sort_labels

# Share of each fold's training images (whole groups) kept for choosing the best epoch: on
# BDGP, 0.05 beat 0.15 (more images to learn from outweigh a noisier choice; docs/accuracy.md).
VALID_FRACTION = 0.05


class CrossvalError(FlystageError, ValueError):
    """Records that cannot be cross-validated (too few groups, a missing group column)."""


@dataclass
class Fold:
    """One fold: the held-out group and the records its model was given."""

    group: str
    train: list[Record]
    valid: list[Record]
    test: list[Record]


def group_of(record: Record, group_column: str = "group") -> str:
    """The record's group: the manifest's ``group`` column or any extra column."""
    if group_column == "group":
        return record.group
    try:
        return record.extra[group_column]
    except KeyError:
        raise CrossvalError(
            f"{record.path}: the manifest has no column {group_column!r}; "
            f"use 'group' or one of {sorted(record.extra)}"
        ) from None


def inner_validation_groups(groups: dict[str, int], fraction: float, seed: int) -> list[str]:
    """Training groups to validate on: whole groups, about ``fraction`` of the images.

    ``groups`` maps each training group to its image count. Groups are visited in a seeded
    order and taken when that brings the valid share closer to ``fraction`` (so a group
    larger than twice the target is never taken); if none is, the smallest is. At least one
    group is always left to train on.
    """
    if len(groups) < 2:
        raise CrossvalError(
            f"need at least 2 training groups to hold one out for validation, got {sorted(groups)}"
        )
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    total = sum(groups.values())
    chosen: list[str] = []
    taken = 0
    for name in order:
        if len(chosen) == len(groups) - 1:
            break
        if abs((taken + groups[name]) / total - fraction) < abs(taken / total - fraction):
            chosen.append(name)
            taken += groups[name]
    return chosen or [min(order, key=lambda name: (groups[name], name))]


def _by_group(records: Sequence[Record], group_column: str) -> dict[str, list[Record]]:
    by_group: dict[str, list[Record]] = {}
    for record in records:
        by_group.setdefault(group_of(record, group_column), []).append(record)
    return by_group


def make_folds(
    records: Sequence[Record],
    group_column: str = "group",
    folds: Sequence[str] | None = None,
    valid_fraction: float = VALID_FRACTION,
    seed: int = 0,
) -> list[Fold]:
    """One fold per group (or per group in ``folds``): that group is the test set, a few other
    groups the validation set, the rest the training set."""
    by_group = _by_group(records, group_column)
    if len(by_group) < 3:
        raise CrossvalError(
            "leave-one-group-out needs at least 3 groups (test, valid, train), got "
            f"{len(by_group)}: {sorted(by_group)}; check the manifest's {group_column!r} column"
        )
    held_out = sorted(by_group) if folds is None else list(folds)
    unknown = sorted(set(held_out) - set(by_group))
    if unknown:
        raise CrossvalError(
            f"fold group(s) {unknown} are not in the manifest; groups: {sorted(by_group)}"
        )
    out = []
    for i, group in enumerate(held_out):
        rest = {g: len(rs) for g, rs in by_group.items() if g != group}
        valid_groups = set(inner_validation_groups(rest, valid_fraction, seed + i))
        out.append(
            Fold(
                group=group,
                train=[
                    r
                    for g, rs in by_group.items()
                    if g != group and g not in valid_groups
                    for r in rs
                ],
                valid=[r for g in sorted(valid_groups) for r in by_group[g]],
                test=list(by_group[group]),
            )
        )
    return out


def _strata(by_group: dict[str, list[Record]]) -> dict[str, str]:
    """Each group's most frequent label (the earlier stage on a tie): what it is stratified by.
    A group of one image (an embryo) is its image's label."""
    strata = {}
    for group, members in by_group.items():
        counts: dict[str, int] = {}
        for record in members:
            counts[record.label] = counts.get(record.label, 0) + 1
        order = sort_labels(counts)
        strata[group] = max(order, key=lambda label: (counts[label], -order.index(label)))
    return strata


def stratified_validation_groups(
    groups: dict[str, int], strata: dict[str, str], fraction: float, seed: int
) -> list[str]:
    """Training groups to validate on: about ``fraction`` of each label's images, whole groups.

    ``groups`` maps each training group to its image count, ``strata`` each group to its label.
    Within each label :func:`inner_validation_groups` chooses (so each label with at least two
    groups gives at least one, and keeps at least one to train on); labels are visited in stage
    order, each with its own seed. When no label has two groups, the groups are chosen
    regardless of label.
    """
    by_label: dict[str, dict[str, int]] = {}
    for group in sorted(groups):
        by_label.setdefault(strata[group], {})[group] = groups[group]
    chosen = []
    for j, label in enumerate(sort_labels(by_label)):
        if len(by_label[label]) >= 2:
            chosen += inner_validation_groups(by_label[label], fraction, seed + j)
    return chosen or inner_validation_groups(groups, fraction, seed)


def make_kfolds(
    records: Sequence[Record],
    k: int,
    group_column: str = "group",
    valid_fraction: float = VALID_FRACTION,
    seed: int = 0,
) -> list[Fold]:
    """``k`` folds of whole groups, stratified by label; fold ``i``'s groups are its test set,
    a stratified ``valid_fraction`` of the other groups its validation set, the rest its
    training set. Every group is tested exactly once.

    Groups are dealt label by label (each group counted under its most frequent label; within
    a label in a seeded order, larger groups first), each to the fold with the fewest images of
    that label so far, ties to the fold with the fewest images: with one image per group
    (a stratified k-fold), every fold's count of every label is within one of every other
    fold's, and so are the folds' sizes. Folds are named ``fold1`` ... ``fold<k>``.
    """
    by_group = _by_group(records, group_column)
    if not isinstance(k, int) or k < 2:
        raise CrossvalError(f"k-fold cross-validation needs k >= 2 folds, not {k!r}")
    if len(by_group) < k + 2:
        raise CrossvalError(
            f"{k} folds need at least {k + 2} groups (each fold tests at least one and "
            f"validates and trains on others), got {len(by_group)}; "
            f"check the manifest's {group_column!r} column or lower k"
        )
    strata = _strata(by_group)
    labels = sort_labels(strata.values())
    order = sorted(by_group)
    random.Random(seed).shuffle(order)
    # A stable sort keeps the seeded order among groups of one label and size.
    order.sort(key=lambda g: (labels.index(strata[g]), -len(by_group[g])))
    per_label = {label: [0] * k for label in labels}
    sizes = [0] * k
    assigned: list[list[str]] = [[] for _ in range(k)]
    for group in order:
        counts = per_label[strata[group]]
        i = min(range(k), key=lambda f: (counts[f], sizes[f], f))
        assigned[i].append(group)
        counts[i] += len(by_group[group])
        sizes[i] += len(by_group[group])
    out = []
    for i, test_groups in enumerate(assigned):
        held_out = set(test_groups)
        rest = {g: len(rs) for g, rs in by_group.items() if g not in held_out}
        valid_groups = set(stratified_validation_groups(rest, strata, valid_fraction, seed + i))
        out.append(
            Fold(
                group=f"fold{i + 1}",
                train=[r for g in sorted(rest) if g not in valid_groups for r in by_group[g]],
                valid=[r for g in sorted(valid_groups) for r in by_group[g]],
                test=[r for g in sorted(test_groups) for r in by_group[g]],
            )
        )
    return out


def plan_folds(
    records: Sequence[Record],
    group_column: str = "group",
    folds: Sequence[str] | None = None,
    k: int | None = None,
    valid_fraction: float = VALID_FRACTION,
    seed: int = 0,
) -> list[Fold]:
    """:func:`make_folds` (one fold per group, or per group in ``folds``), or with ``k``
    :func:`make_kfolds`."""
    if k is None:
        return make_folds(records, group_column, folds, valid_fraction, seed)
    if folds is not None:
        raise CrossvalError("folds name held-out groups, which k folds choose themselves")
    return make_kfolds(records, k, group_column, valid_fraction, seed)
