"""The group-aware stratified split: groups apart, labels stratified, deterministic by seed."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from flystage.manifest import Record
from flystage.organise_error import OrganiseError
from flystage.splitting import assign_splits, split_groups


def test_split_keeps_groups_apart_stratifies_and_is_deterministic():
    # 30 groups of 1-4 images with 3 labels.
    groups = {f"g{i}": Counter({["a", "b", "c"][i % 3]: 1 + i % 4}) for i in range(30)}
    first = split_groups(groups, (0.6, 0.2, 0.2), seed=1)
    assert first == split_groups(groups, (0.6, 0.2, 0.2), seed=1)
    sizes: dict[str, Counter] = defaultdict(Counter)
    for g, s in first.items():
        sizes[s].update(groups[g])
    total = sum(sum(c.values()) for c in groups.values())
    for split, frac in (("train", 0.6), ("valid", 0.2), ("test", 0.2)):
        n = sum(sizes[split].values())
        assert abs(n / total - frac) < 0.05, (split, n)
        assert set(sizes[split]) == {"a", "b", "c"}  # every label in every split
    # Singleton groups: the split follows the fractions per label within one image.
    singles = {f"s{i}": Counter({"x" if i < 40 else "y": 1}) for i in range(60)}
    counts = Counter(
        (s, next(iter(groups_c)))
        for g, s in split_groups(singles, seed=5).items()
        for groups_c in [singles[g]]
    )
    assert (
        counts[("train", "x")] == 28 and counts[("valid", "x")] == 6 and counts[("test", "x")] == 6
    )
    assert counts[("train", "y")] == 14 and counts[("valid", "y")] + counts[("test", "y")] == 6
    # Different seeds order equal-size groups differently.
    assert split_groups(singles, seed=5) != split_groups(singles, seed=6)


def test_split_gives_every_split_a_group_when_possible():
    groups = {"big": Counter({"a": 50}), "mid": Counter({"a": 3}), "small": Counter({"a": 2})}
    assert set(split_groups(groups).values()) == {"train", "valid", "test"}
    with pytest.raises(OrganiseError, match="fractions"):
        split_groups(groups, (0.5, 0.5))


def test_assign_splits_keeps_each_group_in_one_split_or_marks_all_train():
    records = [
        Record(Path(f"/d/{g}_{i}.tif"), "ab"[i % 2], g, "valid", "")
        for g in ("e1", "e2", "e3", "e4", "e5", "e6")
        for i in range(3)
    ]
    assign_splits(records, "none")
    assert {r.split for r in records} == {"train"}
    assign_splits(records, "stratified", (0.6, 0.2, 0.2), seed=2)
    splits_of: dict[str, set[str]] = defaultdict(set)
    for r in records:
        splits_of[r.group].add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    per_group = {g: Counter(r.label for r in records if r.group == g) for g in splits_of}
    assert {g: s.pop() for g, s in splits_of.items()} == split_groups(per_group, (0.6, 0.2, 0.2), 2)
