"""The default dataset: 193 BDGP in situ images of staged embryos, fetched and verified.

The images come from the public insitu-tools repository (folder ``data/``, laid out as
``<gene>/<stage_range>/<image_id>.bmp``), pinned to one commit and checked file by file
against the SHA-1 list shipped with flystage. Where there is no internet, point
``FLYSTAGE_DATA`` at a copy of the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from flystage.errors import FlystageError

BDGP_COMMIT = "fd10c9d89832c48c50af5ae38bc6bf94d6dbde57"
BDGP_URL = f"https://github.com/zzhmark/insitu-tools/archive/{BDGP_COMMIT}.tar.gz"
MARKER = ".flystage-download"
DEFAULT_CACHE = Path(os.environ.get("FLYSTAGE_CACHE", Path.home() / ".cache" / "flystage"))


class DatasetError(FlystageError, RuntimeError):
    """The dataset could not be found, downloaded or verified."""


def bdgp_checksums() -> dict[str, str]:
    """Relative path -> SHA-1 of every image in the BDGP example set."""
    text = resources.files("flystage.resources").joinpath("bdgp-insitu.sha1").read_text()
    sums = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            digest, path = line.split(maxsplit=1)
            sums[path] = digest
    return sums


def bdgp_by_gene(data: Path) -> list:
    """Every image of a bdgp-insitu folder (or a lab-like copy of one) as manifest records:
    its stage range from ``labels.csv`` as the label, its gene as the group, all in one split
    ("none": cross-validation holds out genes itself)."""
    from flystage.organise import organise

    return organise(
        [data],
        labels_csv=data / "labels.csv",
        label_column="stage_range",
        group_column="gene",
        split="none",
    ).records


def sha1_of(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(folder: Path, checksums: dict[str, str] | None = None) -> list[str]:
    """Problems found in ``folder`` against the checksum list (empty when all is well)."""
    checksums = bdgp_checksums() if checksums is None else checksums
    problems = []
    for rel, digest in checksums.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"missing: {rel}")
        elif sha1_of(path) != digest:
            problems.append(f"checksum mismatch: {rel}")
    return problems


def fetch_bdgp(dest: Path | None = None, url: str = BDGP_URL) -> Path:
    """The folder of verified BDGP images: ``$FLYSTAGE_DATA``, else a cached or fresh download.

    Returns a folder holding ``<gene>/<stage_range>/<image_id>.bmp``. Raises DatasetError
    when neither a verified copy nor the download is available.
    """
    env = os.environ.get("FLYSTAGE_DATA")
    if env:
        folder = Path(env)
        problems = verify(folder) if folder.is_dir() else [f"{folder} is not a folder"]
        if problems:
            raise DatasetError(
                f"FLYSTAGE_DATA={folder} is not a complete BDGP example set ({len(problems)} "
                f"problems, first: {problems[0]}); unset it to download the set, or point it at "
                "the right folder"
            )
        return folder
    dest = (dest or DEFAULT_CACHE / "bdgp-insitu").resolve()
    if dest.is_dir() and not verify(dest):
        return dest
    _download_and_extract(url, dest)
    problems = verify(dest)
    if problems:
        raise DatasetError(f"downloaded BDGP set at {dest} failed verification: {problems[:3]}")
    return dest


def _download_and_extract(url: str, dest: Path) -> None:
    checksums = bdgp_checksums()
    with tempfile.TemporaryDirectory(prefix="flystage-fetch-") as tmp:
        archive = Path(tmp) / "archive.tar.gz"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc="BDGP images", disable=None
                ) as bar:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        out.write(block)
                        bar.update(len(block))
        except OSError as exc:
            raise DatasetError(
                f"could not download {url} ({exc}); without internet, set FLYSTAGE_DATA to a copy "
                "of the bdgp-insitu folder"
            ) from exc
        staging = Path(tmp) / "staging"
        with tarfile.open(archive) as tar:
            # Only the listed images are taken, and the "data" filter refuses links and
            # paths that would escape the folder.
            members = [m for m in tar.getmembers() if _relative_data_path(m.name) in checksums]
            for member in members:
                member.name = _relative_data_path(member.name)
            tar.extractall(staging, members=members, filter="data")
        (staging / MARKER).write_text(url + "\n")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            if not (dest / MARKER).is_file():
                raise DatasetError(
                    f"{dest} exists and was not made by flystage; choose another --dest"
                )
            shutil.rmtree(dest)  # an earlier, incomplete download of ours
        shutil.move(str(staging), dest)


def _relative_data_path(name: str) -> str:
    """``insitu-tools-<commit>/data/Dl/4-6/x.bmp`` -> ``Dl/4-6/x.bmp`` ('' outside data/)."""
    parts = name.split("/")
    return "/".join(parts[2:]) if len(parts) > 2 and parts[1] == "data" else ""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help=f"where to keep the download (default {DEFAULT_CACHE}/bdgp-insitu)",
    )
    parser.add_argument(
        "--url", default=BDGP_URL, help="archive to download (default: the pinned commit)"
    )


def run(args: argparse.Namespace) -> int:
    print(fetch_bdgp(args.dest, args.url))
    return 0
