"""Make a lab-like copy of the BDGP images: dim 16-bit grey TIFFs on a 1110x420 frame.

    python bench/make_lablike.py OUT [--data DIR] [--seed 0] [--max-angle 180] [--mirror] [--force]

The lab's own images are not BDGP's: 1110x420, 16-bit greyscale, "black with faint grey
lines" (the embryo a little brighter than a dark background, a low dynamic range), the
embryo anywhere in the frame at any angle, and no two sessions alike: the camera's offset,
the exposure, the focus, the noise and the evenness of the illumination vary. To measure the
default model on images like those (``bench/bench_accuracy.py --lablike``), each of the 193
BDGP images (``$FLYSTAGE_DATA``, a 320x128 RGB brightfield image, embryo cut out on white)
becomes one such TIFF:

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
5. placed at a random position (the whole turned frame inside the canvas), its brightest
   part ``contrast`` counts above the background;
6. out of focus by a Gaussian blur of ``blur`` pixels (sigma; 0 = in focus);
7. on a background of ``background`` counts (the camera's offset and the sample's glow), the
   whole frame lit unevenly: multiplied by a linear ramp from ``1 - gradient / 2`` to
   ``1 + gradient / 2`` across the frame in a random direction;
8. Gaussian noise of sigma ``noise`` counts everywhere; rounded to uint16.

Each of ``contrast``, ``blur``, ``background``, ``noise`` and ``gradient`` is drawn per image,
uniformly from its range in :class:`LablikeConfig`:

=============  ================  =====================================================
parameter      range (default)   what it is
=============  ================  =====================================================
background     100 - 600         counts of 65535: dark, as the lab's camera offset
contrast       300 - 1800        counts the embryo's brightest part rises above it
noise          5 - 40            counts, sigma
blur           0 - 3             pixels of the 1110x420 frame, sigma (3: visibly soft)
gradient       0 - 0.5           share of the level the illumination changes across
=============  ================  =====================================================

so the brightest pixel of a frame stays under about 2,700 counts (4 % of the 16-bit range):
"black with faint grey lines", the dimmest embryo 300 counts above a background whose noise
reaches 40. Where the ramp's rise across the frame (``gradient * background``, up to 300
counts) comes near a dim embryo's contrast, the toolkit's mask can take the brighter side of
the frame instead of the embryo (about 1 % of the images per seed with these ranges): a lab's
uneven illumination is part of what this copy measures.

Every draw comes from a generator seeded with ``seed`` and the image's path, so an image's
copy does not depend on which other images are made, and the same seed gives the same bytes;
another seed gives every image another angle, place, brightness, noise, focus and background.

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
from flystage.manifest import file_sha1
from flystage.reading import read_image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FLYSTAGE_DATA", REPO.parent / "shared" / "data" / "bdgp-insitu"))
COLUMNS = ("path", "gene", "stage_range", "image_id", "sha1")


class LablikeError(ValueError):
    """A lab-like set that cannot be made (missing or changed source, an occupied output)."""


Range = tuple[float, float]


@dataclass(frozen=True)
class LablikeConfig:
    """How a BDGP image becomes a lab-like TIFF (see the module's docstring): the frame, and
    the (low, high) range each per-image parameter is drawn from uniformly."""

    height: int = 420
    width: int = 1110
    scale: float = 1.2
    background: Range = (100.0, 600.0)
    contrast: Range = (300.0, 1800.0)
    noise: Range = (5.0, 40.0)
    blur: Range = (0.0, 3.0)
    gradient: Range = (0.0, 0.5)
    max_angle: float = 180.0
    mirror: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.max_angle <= 180:
            raise LablikeError(f"max_angle must be 0..180 degrees, not {self.max_angle}")
        if self.scale <= 0:
            raise LablikeError(f"scale must be > 0, not {self.scale}")
        for name in ("background", "contrast", "noise", "blur", "gradient"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise LablikeError(f"{name}: need a range 0 <= low <= high, not {low}, {high}")
        if self.gradient[1] >= 2:
            raise LablikeError(f"gradient must stay below 2 (one side dark), not {self.gradient}")
        brightest = (self.background[1] + self.contrast[1]) * (1 + self.gradient[1] / 2)
        if brightest > 60000:
            raise LablikeError(f"background + contrast reach {brightest:.0f}: past 16 bits")


def lablike_image(
    rgb: np.ndarray, rng: np.random.Generator, config: LablikeConfig = LablikeConfig()
) -> tuple[np.ndarray, dict]:
    """One BDGP image (``(H, W, 3)`` uint8 RGB, embryo on white) as a lab-like frame.

    Returns the ``(config.height, config.width)`` uint16 image and the draws (angle, mirror,
    contrast, position of the turned frame's top-left corner, background, noise, blur,
    gradient and its direction in degrees).
    """
    # The draws, always in this order, so that one setting (e.g. mirror, or a range) leaves
    # the others as they were.
    angle = float(rng.uniform(-config.max_angle, config.max_angle))
    mirror = bool(rng.random() < 0.5) and config.mirror
    contrast = float(rng.uniform(*config.contrast))
    u, v = rng.random(2)
    background = float(rng.uniform(*config.background))
    noise = float(rng.uniform(*config.noise))
    blur = float(rng.uniform(*config.blur))
    gradient = float(rng.uniform(*config.gradient))
    direction = float(rng.uniform(0.0, 360.0))

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
    signal = np.zeros((config.height, config.width), np.float32)
    signal[top : top + h, left : left + w] = contrast * x
    if blur > 0:
        # Blurred on the whole frame, so the embryo's edge spreads onto the background.
        signal = cv2.GaussianBlur(signal, (0, 0), blur)
    canvas = (background + signal) * _illumination(config.height, config.width, gradient, direction)
    canvas += rng.normal(0.0, noise, canvas.shape).astype(np.float32)
    out = np.clip(np.rint(canvas), 0, 65535).astype(np.uint16)
    return out, {
        "angle": round(angle, 3),
        "mirror": mirror,
        "contrast": round(contrast, 1),
        "top": top,
        "left": left,
        "background": round(background, 1),
        "noise": round(noise, 2),
        "blur": round(blur, 3),
        "gradient": round(gradient, 4),
        "direction": round(direction, 1),
    }


def _illumination(height: int, width: int, gradient: float, direction: float) -> np.ndarray:
    """A linear ramp from ``1 - gradient / 2`` to ``1 + gradient / 2`` across the frame along
    ``direction`` (degrees): a lamp off the optical axis lights one side more."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    along = np.cos(np.radians(direction)) * xx + np.sin(np.radians(direction)) * yy
    span = float(along.max() - along.min())
    return 1.0 + gradient * ((along - along.min()) / span - 0.5)


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
