"""Make a lab-like copy of the BDGP images: dim 16-bit grey TIFFs on a 1110x420 frame.

    python bench/make_lablike.py OUT [--data DIR] [--seed 0] [--max-angle 180] [--mirror] [--force]

The lab's own images are not BDGP's: 1110x420, 16-bit greyscale, "black with faint grey
lines" (the embryo a little brighter than a dark background, a low dynamic range), the
embryo anywhere in the frame at any angle. To measure the default model on images like those
(``bench/bench_accuracy.py --lablike``), each of the 193 BDGP images (``$FLYSTAGE_DATA``, a
320x128 RGB brightfield image, embryo cut out on white) becomes one such TIFF:

1. grey from the blue channel (the in situ stain almost vanishes there, the relief stays);
2. inverted, so the embryo is bright and BDGP's white background (exactly 255) becomes 0;
   scaled to [0, 1] by the embryo's 99.5th percentile;
3. enlarged by ``scale`` (1.2: the frame's diagonal, 414 pixels, still fits the 420-pixel
   height at any angle, so the embryo is always whole);
4. turned by a random angle, uniform in [-max_angle, max_angle] degrees (default 180: any
   angle). No mirror image by default (``--mirror`` adds a random one): a turn is what a
   microscope's stage does to an embryo, a mirror image is not. Note that a turn beyond 90
   degrees puts the anterior on the right once the toolkit aligns the long axis, so by
   default half the images face the other way from BDGP's, as the lab's embryos do;
   ``--max-angle 90`` keeps BDGP's head direction (apart from near-vertical draws);
5. placed at a random position (the whole turned frame inside the canvas) on a background of
   ``low`` counts (200 of 65535), at a random brightness: the embryo's top reaches
   ``low + gain * (high - low)`` with gain uniform in [0.7, 1.0] (``high`` 1400);
6. Gaussian noise (sigma 15 counts) everywhere; rounded to uint16.

Every draw comes from a generator seeded with ``seed`` and the image's path, so an image's
copy does not depend on which other images are made, and the same seed gives the same bytes.

The output keeps BDGP's layout, ``<gene>/<stage_range>/<image_id>.tif``, with a
``labels.csv`` of the same columns (path relative to OUT, gene, stage_range, image_id, sha1
of the new file), so ``organise([OUT], labels_csv=OUT / "labels.csv",
label_column="stage_range", group_column="gene")`` reads it exactly as it reads BDGP, and a
``lablike.json`` with the settings and every image's draws. An existing non-empty OUT is
refused unless ``--force`` (then files of the same names are replaced; others are left, and
organise ignores them since labels.csv does not list them).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from flystage.augment import rotate_full
from flystage.imaging import read_image
from flystage.organise import file_sha1

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FLYSTAGE_DATA", REPO.parent / "shared" / "data" / "bdgp-insitu"))
COLUMNS = ("path", "gene", "stage_range", "image_id", "sha1")


class LablikeError(ValueError):
    """A lab-like set that cannot be made (missing or changed source, an occupied output)."""


@dataclass(frozen=True)
class LablikeConfig:
    """How a BDGP image becomes a lab-like TIFF (see the module's docstring)."""

    height: int = 420
    width: int = 1110
    scale: float = 1.2
    low: float = 200.0
    high: float = 1400.0
    gain_min: float = 0.7
    noise: float = 15.0
    max_angle: float = 180.0
    mirror: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.max_angle <= 180:
            raise LablikeError(f"max_angle must be 0..180 degrees, not {self.max_angle}")
        if not 0 <= self.low < self.high <= 65535:
            raise LablikeError(f"need 0 <= low < high <= 65535, not {self.low}, {self.high}")
        if not 0 < self.gain_min <= 1:
            raise LablikeError(f"gain_min must be in (0, 1], not {self.gain_min}")
        if self.scale <= 0 or self.noise < 0:
            raise LablikeError(f"scale must be > 0 and noise >= 0, not {self.scale}, {self.noise}")


def lablike_image(
    rgb: np.ndarray, rng: np.random.Generator, config: LablikeConfig = LablikeConfig()
) -> tuple[np.ndarray, dict]:
    """One BDGP image (``(H, W, 3)`` uint8 RGB, embryo on white) as a lab-like frame.

    Returns the ``(config.height, config.width)`` uint16 image and the draws (angle, mirror,
    gain, position of the turned frame's top-left corner).
    """
    # The draws, always in this order, so that one setting (e.g. mirror) leaves the others as
    # they were.
    angle = float(rng.uniform(-config.max_angle, config.max_angle))
    mirror = bool(rng.random() < 0.5) and config.mirror
    gain = float(rng.uniform(config.gain_min, 1.0))
    u, v = rng.random(2)

    inverted = (255.0 - rgb[:, :, 2].astype(np.float32)) / 255.0
    embryo = inverted[inverted > 0.02]
    peak = float(np.percentile(embryo, 99.5)) if embryo.size else 1.0
    x = np.clip(inverted / max(peak, 1e-3), 0.0, 1.0)
    if mirror:
        x = x[::-1]
    x = cv2.resize(x, None, fx=config.scale, fy=config.scale, interpolation=cv2.INTER_LINEAR)
    x = rotate_full(x, angle)
    h, w = x.shape
    if h > config.height or w > config.width:
        raise LablikeError(
            f"a {rgb.shape[1]}x{rgb.shape[0]} image enlarged {config.scale}x "
            f"and turned {angle:.0f} degrees "
            f"({w}x{h}) does not fit the {config.width}x{config.height} frame; lower the scale"
        )
    top, left = int(v * (config.height - h + 1)), int(u * (config.width - w + 1))
    canvas = np.full((config.height, config.width), config.low, np.float32)
    canvas[top : top + h, left : left + w] += gain * (config.high - config.low) * x
    canvas += rng.normal(0.0, config.noise, canvas.shape).astype(np.float32)
    out = np.clip(np.rint(canvas), 0, 65535).astype(np.uint16)
    return out, {
        "angle": round(angle, 3),
        "mirror": mirror,
        "gain": round(gain, 4),
        "top": top,
        "left": left,
    }


def read_labels(source: Path) -> list[dict[str, str]]:
    """The rows of ``source/labels.csv`` (BDGP's columns)."""
    csv_path = source / "labels.csv"
    if not csv_path.is_file():
        raise LablikeError(
            f"{csv_path} not found: point --data (or FLYSTAGE_DATA) at the bdgp-insitu folder"
        )
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise LablikeError(
                f"{csv_path}: missing column(s) {missing}; expected {', '.join(COLUMNS)}"
            )
        return list(reader)


def make_lablike(
    source: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    config: LablikeConfig = LablikeConfig(),
    only: Iterable[str] | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write the lab-like copy of the BDGP folder ``source`` into ``out``; return its labels.csv.

    ``only`` limits it to these ``path`` values of ``source/labels.csv``. Every source file is
    checked against its SHA-1 first. Raises :class:`LablikeError` when ``out`` is not empty
    (unless ``force``), lies inside ``source``, or a source file is missing or changed.
    """
    source, out = Path(source).resolve(), Path(out).resolve()
    rows = read_labels(source)
    if only is not None:
        wanted = set(only)
        unknown = sorted(wanted - {r["path"] for r in rows})
        if unknown:
            raise LablikeError(f"not in {source / 'labels.csv'}: {unknown}")
        rows = [r for r in rows if r["path"] in wanted]
    if out == source or source in out.parents:
        raise LablikeError(
            f"{out} is inside the source folder {source}; write the lab-like set elsewhere"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise LablikeError(
            f"{out} exists and is not empty; "
            "choose another folder or pass --force to replace its files"
        )
    for row in rows:
        path = source / row["path"]
        if not path.is_file():
            raise LablikeError(
                f"{path}: listed in labels.csv but missing; fetch the data set again"
            )
        if file_sha1(path) != row["sha1"]:
            raise LablikeError(f"{path}: SHA-1 differs from labels.csv; fetch the data set again")

    out.mkdir(parents=True, exist_ok=True)
    written, draws = [], {}
    for row in rows:
        rel = Path(row["path"]).with_suffix(".tif").as_posix()
        rng = np.random.default_rng([seed, zlib.crc32(row["path"].encode("utf-8"))])
        image, drawn = lablike_image(read_image(source / row["path"]), rng, config)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(target, image, photometric="minisblack")
        written.append({**{c: row[c] for c in COLUMNS}, "path": rel, "sha1": file_sha1(target)})
        draws[rel] = drawn
    labels_csv = out / "labels.csv"
    with open(labels_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(written)
    settings = {"source": str(source), "seed": seed, "config": asdict(config), "images": draws}
    (out / "lablike.json").write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    if log:
        log(
            f"wrote {len(written)} lab-like {config.width}x{config.height} 16-bit TIFFs "
            f"and {labels_csv}"
        )
    return labels_csv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out", type=Path, help="folder to write (must not exist or be empty, unless --force)"
    )
    parser.add_argument(
        "--data", type=Path, default=DATA, help="the bdgp-insitu folder (default: $FLYSTAGE_DATA)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    parser.add_argument(
        "--max-angle",
        type=float,
        default=180.0,
        help="turn by an angle uniform in [-A, A] degrees "
        "(default 180: any angle; 90 keeps the head left)",
    )
    parser.add_argument(
        "--mirror", action="store_true", help="also mirror half the images (default: turns only)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty folder, replacing files of the same names",
    )
    args = parser.parse_args(argv)
    try:
        config = LablikeConfig(max_angle=args.max_angle, mirror=args.mirror)
        make_lablike(
            args.data, args.out, seed=args.seed, config=config, force=args.force, log=print
        )
    except LablikeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
