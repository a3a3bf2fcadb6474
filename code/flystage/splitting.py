"""The group-aware stratified split: every group (an embryo, a gene, a session) goes to one of
train, valid and test, so that each split's label counts approach its fraction. No torch.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from flystage.manifest import SPLITS, Record
from flystage.organise_error import OrganiseError

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
# "none": every image train (cross-validation draws its own folds).
SPLIT_MODES = ("stratified", "none")


def split_groups(
    group_labels: dict[str, Counter], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, str]:
    """Assign each group to a split so that every split's label counts approach its fraction.

    ``group_labels`` maps group -> Counter of labels. Groups are visited largest first (a
    seeded shuffle orders groups of equal size); each goes to the split where it most reduces
    the squared shortfall from the target counts, per label (weighted by 1 / label total, so
    rare stages count as much as common ones) and in total. Returns group -> split.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise OrganiseError(
            f"split fractions {list(fractions)}: give three non-negative numbers, e.g. "
            "0.7,0.15,0.15"
        )
    total_f = sum(fractions)
    fractions = [f / total_f for f in fractions]
    label_totals: Counter = Counter()
    for counts in group_labels.values():
        label_totals.update(counts)
    n = sum(label_totals.values())
    target = [{label: f * t for label, t in label_totals.items()} for f in fractions]
    current: list[Counter] = [Counter() for _ in SPLITS]
    size = [0] * len(SPLITS)

    order = sorted(group_labels)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -sum(group_labels[g].values()))  # stable: shuffle breaks ties

    assignment: dict[str, str] = {}
    for g in order:
        counts = group_labels[g]
        g_size = sum(counts.values())
        best, best_cost = None, math.inf
        for s, f in enumerate(fractions):
            if f == 0:
                continue
            # Change in sum of squared (current - target) if g joins split s.
            cost = sum(
                k * (k + 2 * (current[s][label] - target[s][label])) / label_totals[label]
                for label, k in counts.items()
            )
            cost += g_size * (g_size + 2 * (size[s] - f * n)) / n
            if cost < best_cost - 1e-12:
                best, best_cost = s, cost
        assignment[g] = SPLITS[best]
        current[best].update(counts)
        size[best] += g_size

    # A split with a share must not end up empty when another split can spare a group.
    for s, f in enumerate(fractions):
        members = [g for g, sp in assignment.items() if sp == SPLITS[s]]
        if f > 0 and not members:
            by_split = Counter(assignment.values())
            donor = max(by_split, key=lambda sp: by_split[sp])
            if by_split[donor] > 1:
                smallest = min(
                    (g for g, sp in assignment.items() if sp == donor),
                    key=lambda g: (sum(group_labels[g].values()), order.index(g)),
                )
                assignment[smallest] = SPLITS[s]
    return assignment


def assign_splits(
    records: Sequence[Record],
    split: str = "stratified",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> None:
    """Set every record's ``split`` in place: ``split`` ``"none"`` marks all train (for
    cross-validation); ``"stratified"`` splits the records' groups by :func:`split_groups`."""
    if split == "none":
        for r in records:
            r.split = "train"
        return
    per_group: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        per_group[r.group][r.label] += 1
    assignment = split_groups(per_group, fractions, seed)
    for r in records:
        r.split = assignment[r.group]
