"""Stage a lab's images as a channel folder: ``manifest.csv`` plus the images it lists.

A channel folder is what a job's channel holds (what ``make upload`` puts under an S3
prefix for SageMaker): the manifest with paths relative to itself, and a copy of every
image. Staging copies, so nothing a job does can touch the lab's originals. A channel is
named by the hash of its contents and reused when staged again (tuning trials share one).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from flystage.jobdef import DATA_MANIFEST
from flystage.manifest import ManifestError, Record, read_manifest, write_manifest
from flystage.organise import organise, report_text
from flystage_local import LocalModeError

# BDGP's layout is <gene>/<stage>/<id>.bmp: the gene, the first folder, is the group.
GENE_GROUP_REGEX = r"^(?P<group>[^/]+)/"


def _records(
    sources: Sequence[str | Path], group_regex: str, seed: int
) -> tuple[list[Record], str]:
    """Records from a manifest CSV, or from organising image folders; and a report."""
    try:
        if len(sources) == 1 and Path(sources[0]).suffix.lower() == ".csv":
            records = read_manifest(sources[0])
            return records, f"read {len(records)} images from {sources[0]}"
        result = organise(sources, group_regex=group_regex, seed=seed)
    except ManifestError as exc:  # OrganiseError is one
        raise LocalModeError(str(exc)) from None
    return result.records, report_text(result)


def _channel_key(records: Sequence[Record]) -> str:
    digest = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.sha1):
        digest.update(f"{r.sha1},{r.label},{r.group},{r.split}\n".encode())
    return digest.hexdigest()[:16]


def stage_channel(
    sources: Sequence[str | Path],
    channels_root: str | Path,
    group_regex: str = GENE_GROUP_REGEX,
    seed: int = 0,
) -> tuple[Path, str]:
    """Stage ``sources`` (image folders, or one manifest CSV) under ``channels_root``.

    Returns the channel folder (``channels_root/channel-<hash>/``) and the organise report.
    The images keep their paths relative to the folders' common parent.
    """
    if not sources:
        raise LocalModeError("no data given: name image folders (DATA=...) or a manifest CSV")
    records, report = _records(sources, group_regex, seed)
    channel = Path(channels_root).resolve() / f"channel-{_channel_key(records)}"
    if (channel / DATA_MANIFEST).is_file():
        return channel, report + f"\nreusing staged channel {channel}"
    channel.parent.mkdir(parents=True, exist_ok=True)
    common = Path(os.path.commonpath([r.path.resolve().parent for r in records]))
    # Built in a scratch folder and renamed into place, so a crash never leaves a half
    # channel that a later job would reuse.
    scratch = Path(tempfile.mkdtemp(prefix=".staging-", dir=channel.parent))
    try:
        staged = []
        for r in records:
            target = scratch / r.path.resolve().relative_to(common)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(r.path, target)
            staged.append(replace(r, path=target))
        write_manifest(staged, scratch / DATA_MANIFEST)
        os.replace(scratch, channel)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return channel, report + f"\nstaged {len(records)} images into {channel}"
