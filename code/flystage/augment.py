"""Training augmentation, on the fly and offline.

On the fly: :func:`build_train_transform` returns an :class:`Augmenter`, a callable on the
preprocessed float32 ``(C, H, W)`` arrays of :func:`flystage.imaging.preprocess` (or torch
tensors of that shape) that returns an array of the same shape, dtype and range [0, 1]. It
draws, per image, from :class:`AugmentConfig`:

- one of the lab's large rotations (45, 90, 135, 180, 270 degrees), about the centre, the
  result fitted back into the frame so the embryo is never cut off (at 90 degrees it is
  shrunk to fit the height);
- a small random rotation, scale and shift;
- flips (off by default: the lab found them harmful; mirror images are not real embryos'
  left-right asymmetries);
- intensity gain and gamma, Gaussian blur, noise on the embryo, and random erasing of
  patches (set to 0, the background value: "masking").

With ``PreprocessConfig.align`` on, every image reaching the model has its long axis
horizontal, so the 45/90/135/270 degree rotations show the model poses it never meets at
inference; only the 180 degree turn (head left or right, which alignment cannot decide)
matters then, and small rotations cover the alignment's errors. Keep the large angles for
models trained without alignment, as the lab did.

Offline: ``flystage augment --manifest M --split train --out DIR`` writes the lab's old
augmented set for ONE split: each image as PNG plus one rotated PNG per angle, and a
manifest of the new set.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from flystage.files import OutputExistsError, atomic_write, png_bytes
from flystage.options import option

__all__ = [
    "LAB_ANGLES",
    "AugmentConfig",
    "Augmenter",
    "build_train_transform",
    "sample_rng",
    "rotate_fitted",
    "rotate_full",
    "augment_split",
    "configure_parser",
    "run",
]

LAB_ANGLES = (45.0, 90.0, 135.0, 180.0, 270.0)


@dataclass(frozen=True)
class AugmentConfig:
    """What the on-the-fly augmentation draws from; every ``p_*`` is a per-image probability.

    Attributes
    ----------
    angles : tuple of float
        Large rotations in degrees (counter-clockwise as displayed); with probability
        ``p_angle`` one of them is chosen uniformly. With ``PreprocessConfig.align`` on,
        inputs are always horizontal, so ``(180,)`` is the one that matters.
    max_rotation : float
        Small rotation drawn from [-max_rotation, max_rotation] degrees (``p_rotation``).
    max_scale : float
        Zoom drawn from [1 - max_scale, 1 + max_scale] (``p_affine``, with the shift).
    max_shift : float
        Shift of up to this fraction of the width and height (``p_affine``).
    max_gain : float
        Intensity multiplied by a gain in [1 - max_gain, 1 + max_gain] (``p_intensity``).
    max_gamma : float
        Intensity raised to exp(u), u in [-max_gamma, max_gamma] (``p_intensity``).
    max_blur : float
        Gaussian blur with sigma in [0.3, max_blur] pixels (``p_blur``).
    max_noise : float
        Gaussian noise with SD up to this, added on the embryo only (non-zero pixels), so the
        masked background stays black (``p_noise``).
    max_erase : float
        Random erasing: 1 to ``erase_count`` patches, each up to this fraction of the image's
        area, centred on the embryo, set to 0 (``p_erase``).
    p_hflip, p_vflip : float
        Left-right and up-down flips; 0 by default.
    """

    # With alignment on (the default) only the 180-degree turn changes what the model sees,
    # and on BDGP (heads all left) even that cost accuracy (docs/accuracy.md), so it is off;
    # p_angle > 0 turns it on, angles=LAB_ANGLES gives the lab's angles for unaligned images.
    angles: tuple[float, ...] = option(
        (180.0,),
        "large rotations in degrees, one drawn with probability p_angle; "
        "with align on (inputs horizontal) 180 is the one that matters",
    )
    p_angle: float = option(
        0.0,
        "probability of a large rotation from angles (off: the 180-degree turn cost "
        "accuracy on BDGP, whose embryos all face left)",
    )
    max_rotation: float = option(10.0, "small rotation of up to this many degrees either way")
    p_rotation: float = option(0.5, "probability of a small rotation")
    max_scale: float = option(0.1, "zoom by a factor within 1 +- max_scale (below 1)")
    max_shift: float = option(0.05, "shift by up to this fraction of the width and of the height")
    p_affine: float = option(0.5, "probability of a zoom and shift")
    max_gain: float = option(
        0.25, "brightness: intensities multiplied by a gain within 1 +- max_gain (below 1)"
    )
    max_gamma: float = option(
        0.3, "contrast: intensities (0-1) raised to exp(u), u within +- max_gamma"
    )
    p_intensity: float = option(0.5, "probability of a gain and gamma change")
    max_blur: float = option(1.2, "Gaussian blur with a sigma from 0.3 up to this many pixels")
    p_blur: float = option(0.2, "probability of a blur")
    max_noise: float = option(
        0.03,
        "Gaussian noise with a standard deviation up to this (intensities are 0-1), "
        "on the embryo only: the background stays black",
    )
    p_noise: float = option(0.2, "probability of noise")
    max_erase: float = option(
        0.08,
        "random erasing: each patch up to this fraction of the image's area (below 1), "
        "centred on the embryo, set to black",
    )
    erase_count: int = option(2, "random erasing: 1 to this many patches")
    p_erase: float = option(0.3, "probability of random erasing")
    p_hflip: float = option(0.0, "probability of a left-right flip (the head changes sides)")
    p_vflip: float = option(0.0, "probability of an up-down flip (dorsal and ventral swap sides)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "angles", tuple(float(a) for a in self.angles))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{f.name} is a probability and must be in [0, 1], not {value!r}")
            if f.name.startswith("max_") and value < 0:
                raise ValueError(f"{f.name} must be >= 0, not {value!r}")
        if self.max_scale >= 1.0 or self.max_gain >= 1.0 or self.max_erase >= 1.0:
            raise ValueError("max_scale, max_gain and max_erase must be below 1")
        if self.erase_count < 1:
            raise ValueError(f"erase_count must be >= 1, not {self.erase_count!r}")

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation at all (every probability 0)."""
        return cls(**{f.name: 0.0 for f in fields(cls) if f.name.startswith("p_")})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (angles as a list)."""
        data = asdict(self)
        data["angles"] = list(self.angles)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        """The config from :meth:`to_dict`'s output; missing keys take their defaults; unknown
        keys raise ValueError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown augmentation setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A generator for one sample of one epoch: the same augmentation whatever the number of
    data-loader workers or hosts (each worker would otherwise copy one generator's state)."""
    return np.random.default_rng([seed, epoch, index])


def _content_hull(image: np.ndarray) -> np.ndarray:
    """Corner points (N, 2) float, as (x, y), of the convex hull of the non-zero pixels of an
    (H, W[, C]) image, pixel edges included (OpenCV's convention: pixel i spans i +- 0.5);
    the frame's corners if it is blank."""
    h, w = image.shape[:2]
    nz = (image if image.ndim == 2 else image.max(axis=2)) > 0
    points = cv2.findNonZero(nz.astype(np.uint8))
    if points is None:
        return np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64) - 0.5
    hull = cv2.convexHull(points).reshape(-1, 2).astype(np.float64)
    # each pixel is a unit square: take all four of its corners
    return np.concatenate(
        [hull + offset for offset in ((-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5))]
    )


class Augmenter:
    """The on-the-fly augmentation: ``augmenter(image, rng=None) -> image``.

    Parameters
    ----------
    config : AugmentConfig
    seed : int
        Seeds the augmenter's own generator, used when no ``rng`` is passed per call; the
        same seed and call order give the same images.

    The call takes float32 ``(C, H, W)`` in [0, 1] (numpy, or a torch tensor, which is
    returned as a tensor) and returns the same shape, dtype and range.
    """

    def __init__(self, config: AugmentConfig | None = None, seed: int = 0) -> None:
        self.config = config or AugmentConfig()
        self.rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"Augmenter({self.config!r})"

    def __call__(self, image: Any, rng: np.random.Generator | None = None) -> Any:
        if type(image).__module__.startswith("torch"):
            import torch  # only when given a tensor: this module runs without torch

            out = self._augment(image.detach().cpu().numpy(), rng)
            return torch.from_numpy(out).to(image.device)
        return self._augment(np.asarray(image), rng)

    def _augment(self, image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        if image.ndim != 3:
            raise ValueError(f"expected a (C, H, W) image, got shape {image.shape}")
        rng = rng or self.rng
        c = self.config
        x = np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.float32)  # HWC for OpenCV

        x = self._geometry(x, rng)
        if rng.random() < c.p_intensity:
            gain = rng.uniform(1.0 - c.max_gain, 1.0 + c.max_gain)
            gamma = math.exp(rng.uniform(-c.max_gamma, c.max_gamma))
            x = gain * np.power(np.clip(x, 0.0, 1.0), gamma, dtype=np.float32)
        if rng.random() < c.p_blur and c.max_blur > 0:
            sigma = rng.uniform(min(0.3, c.max_blur), c.max_blur)
            x = _keep_channels(cv2.GaussianBlur(x, (0, 0), sigma), x)
        if rng.random() < c.p_noise and c.max_noise > 0:
            sd = rng.uniform(0.0, c.max_noise)
            noise = rng.normal(0.0, sd, x.shape).astype(np.float32)
            x = np.where(x > 0, x + noise, x)
        if rng.random() < c.p_erase:
            x = self._erase(x, rng)
        out = np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def _geometry(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        angle = 0.0
        if c.angles and rng.random() < c.p_angle:
            angle += float(rng.choice(c.angles))
        if rng.random() < c.p_rotation:
            angle += rng.uniform(-c.max_rotation, c.max_rotation)
        scale, shift_x, shift_y = 1.0, 0.0, 0.0
        if rng.random() < c.p_affine:
            scale = rng.uniform(1.0 - c.max_scale, 1.0 + c.max_scale)
            shift_x, shift_y = rng.uniform(-c.max_shift, c.max_shift, 2)
        hflip = rng.random() < c.p_hflip
        vflip = rng.random() < c.p_vflip
        if angle == 0.0 and scale == 1.0 and shift_x == shift_y == 0.0 and not hflip and not vflip:
            return x
        h, w = x.shape[:2]
        # Turn about the embryo, shrink (never enlarge) so that the turned embryo fits the
        # frame whole, centre it, then zoom and shift.
        hull = _content_hull(x)
        cx, cy = hull.mean(axis=0)
        rot = cv2.getRotationMatrix2D((float(cx), float(cy)), angle, 1.0)
        turned = hull @ rot[:, :2].T + rot[:, 2]
        (rx0, ry0), (rx1, ry1) = turned.min(axis=0), turned.max(axis=0)
        # one black pixel kept on each side, so the embryo never touches the frame
        fit = min(1.0, (w - 2) / max(rx1 - rx0, 1.0), (h - 2) / max(ry1 - ry0, 1.0))
        s = fit * scale
        matrix = s * rot
        matrix[:, 2] = s * (rot[:, 2] - [(rx0 + rx1) / 2.0, (ry0 + ry1) / 2.0]) + [
            (w - 1) / 2.0 + shift_x * w,
            (h - 1) / 2.0 + shift_y * h,
        ]
        if hflip:
            matrix = np.array([[-1.0, 0.0, w], [0.0, 1.0, 0.0]]) @ np.vstack([matrix, [0, 0, 1]])
        if vflip:
            matrix = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, h]]) @ np.vstack([matrix, [0, 0, 1]])
        out = cv2.warpAffine(x, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
        return _keep_channels(out, x)

    def _erase(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        h, w = x.shape[:2]
        ys, xs = np.nonzero(x.max(axis=2) > 0)
        x = x.copy()
        for _ in range(int(rng.integers(1, c.erase_count + 1))):
            area = rng.uniform(0.2, 1.0) * c.max_erase * h * w
            ratio = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
            ph = max(1, min(h, int(round(math.sqrt(area / ratio)))))
            pw = max(1, min(w, int(round(math.sqrt(area * ratio)))))
            # On the embryo, so that a patch is never wasted on the black background.
            if ys.size:
                k = int(rng.integers(ys.size))
                cy, cx = int(ys[k]), int(xs[k])
            else:
                cy, cx = int(rng.integers(h)), int(rng.integers(w))
            top, left = max(0, cy - ph // 2), max(0, cx - pw // 2)
            x[top : top + ph, left : left + pw] = 0.0
        return x


def _keep_channels(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    """OpenCV drops a trailing channel axis of size 1; put it back."""
    return out[:, :, None] if out.ndim == 2 and like.ndim == 3 else out


def build_train_transform(
    config: AugmentConfig | None = None, seed: int = 0
) -> Callable[[np.ndarray, np.random.Generator | None], np.ndarray]:
    """The training transform: an :class:`Augmenter` (``transform(image, rng=None)``)."""
    return Augmenter(config, seed)


# ---- offline rotations (the lab's old workflow) ----------------------------------------------


def rotate_full(image: np.ndarray, angle: float, fill: float | tuple[float, ...] = 0) -> np.ndarray:
    """Rotate an ``(H, W)`` or ``(H, W, C)`` image of any dtype by ``angle`` degrees
    (counter-clockwise as displayed) onto a canvas that holds the whole rotated frame.

    Multiples of 90 degrees are exact (no interpolation); other angles are bilinear, with the
    new corners set to ``fill`` (for example the image's background level).
    """
    quarter = angle / 90.0
    if abs(quarter - round(quarter)) < 1e-9:
        return np.ascontiguousarray(np.rot90(image, k=int(round(quarter)) % 4))
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w, new_h = int(math.ceil(h * sin + w * cos)), int(math.ceil(h * cos + w * sin))
    matrix[0, 2] += new_w / 2.0 - w / 2.0
    matrix[1, 2] += new_h / 2.0 - h / 2.0
    border = tuple(
        float(v) for v in np.broadcast_to(fill, (image.shape[2] if image.ndim == 3 else 1,))
    )
    out = cv2.warpAffine(
        image,
        matrix,
        (new_w, new_h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=border + (0.0,) * (4 - len(border)),
    )
    return _keep_channels(out, image)


def rotate_fitted(image: np.ndarray, angle: float) -> np.ndarray:
    """Rotate a float32 ``(C, H, W)`` model input by ``angle`` degrees, the embryo shrunk if
    needed to stay whole inside the same frame (the :class:`Augmenter`'s large rotation)."""
    config = AugmentConfig(
        angles=(angle,),
        p_angle=1.0,
        p_rotation=0.0,
        p_affine=0.0,
        p_intensity=0.0,
        p_blur=0.0,
        p_noise=0.0,
        p_erase=0.0,
    )
    return Augmenter(config)(image)


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text).strip("._") or "unnamed"


def _to_png_array(image: np.ndarray, eight_bit: bool) -> np.ndarray:
    """An array cv2 can write as PNG: uint8, or uint16 (float images are stretched to 16-bit)."""
    from flystage.imaging import stretch_contrast

    if eight_bit:
        if image.dtype == np.uint8:
            return image
        return np.round(stretch_contrast(image, 0.1, 99.9) * 255.0).astype(np.uint8)
    if image.dtype in (np.uint8, np.uint16):
        return image
    return np.round(stretch_contrast(image, 0.0, 100.0) * 65535.0).astype(np.uint16)


def _background(image: np.ndarray) -> tuple[float, ...]:
    """Per-channel median of the frame's corners: the fill for rotated corners."""
    from flystage.imaging import corner_pixels

    planes = [image] if image.ndim == 2 else [image[:, :, i] for i in range(image.shape[2])]
    return tuple(float(np.median(corner_pixels(p))) for p in planes)


def _write_png(path: Path, image: np.ndarray) -> str:
    """Write ``image`` (RGB or grey) as PNG without ever replacing a file; return its SHA-1."""
    try:
        data = png_bytes(image)
    except ValueError:
        raise OSError(f"{path}: OpenCV could not encode the image as PNG") from None
    # No fsync, as before: one per image would slow a split of thousands down, and the
    # outputs can be made again from the sources.
    with atomic_write(path, "wb", force=False, fsync=False, hint="it is never replaced") as f:
        f.write(data)
    return hashlib.sha1(data).hexdigest()


def _output_stems(records: list, out_dir: Path, split: str) -> list[Path]:
    """``out/<split>/<label>/<stem>``, with the source's SHA-1 prefix added where stems clash."""
    stems = [out_dir / split / _safe_name(r.label) / _safe_name(Path(r.path).stem) for r in records]
    counts: dict[str, int] = {}
    for s in stems:
        counts[str(s).lower()] = counts.get(str(s).lower(), 0) + 1
    return [
        s.with_name(f"{s.name}__{(r.sha1 or hashlib.sha1(str(r.path).encode()).hexdigest())[:10]}")
        if counts[str(s).lower()] > 1
        else s
        for s, r in zip(stems, records)
    ]


def _check_out_dir(out_dir: Path, split: str, resume: bool) -> None:
    """Refuse an ``out_dir`` that is not empty (unless ``resume``) or holds another split."""
    from flystage.manifest import ManifestError

    if out_dir.exists() and any(out_dir.iterdir()):
        if not resume:
            raise ManifestError(
                f"{out_dir} is not empty; choose a new --out folder, or pass --resume to finish an "
                "interrupted run there (existing files are kept, never replaced)"
            )
        others = sorted(p.name for p in out_dir.iterdir() if p.is_dir() and p.name != split)
        if others:
            raise ManifestError(
                f"{out_dir} already holds split(s) {others}; an augmented set holds one split "
                "only, so choose another --out folder"
            )


def _output_paths(stem: Path, angles: tuple[float, ...]) -> list[tuple[float, Path]]:
    """(angle, output path) of one image: the original (angle 0), then each rotation."""
    return [(0.0, stem.with_name(stem.name + ".png"))] + [
        (
            a,
            stem.with_name(
                f"{stem.name}_rot{a:03.0f}.png" if a == int(a) else f"{stem.name}_rot{a:g}.png"
            ),
        )
        for a in angles
    ]


def augment_split(
    manifest: str | Path,
    split: str,
    out_dir: str | Path,
    angles: tuple[float, ...] = LAB_ANGLES,
    eight_bit: bool = False,
    resume: bool = False,
    page: int = 0,
    progress: bool | None = None,
) -> tuple[Path, list[str]]:
    """Write the offline augmented set of one split; return (new manifest, failures).

    For every image of ``split`` in ``manifest``: ``<out>/<split>/<label>/<stem>.png`` (the
    original) and ``<stem>_rot045.png`` etc. (rotated on an enlarged canvas, corners filled
    with the background level). 16-bit images stay 16-bit unless ``eight_bit`` (percentile
    stretch). The new manifest ``<out>/manifest.csv`` keeps label, group and split, and adds
    the columns ``source`` and ``angle``.

    Never replaces a file: ``out_dir`` must be empty or absent, unless ``resume``, which
    skips outputs already there (and rewrites its own manifest). Unreadable images are
    skipped and returned as failure messages.
    """
    from tqdm import tqdm

    from flystage.image_checks import ImageError
    from flystage.manifest import ManifestError, Record, file_sha1, read_manifest, write_manifest
    from flystage.reading import read_image

    out_dir = Path(out_dir).expanduser().resolve()
    records = [r for r in read_manifest(manifest) if r.split == split]
    if not records:
        raise ManifestError(
            f"{manifest}: no images in split {split!r}; choose a split that has images"
        )
    new_manifest = out_dir / "manifest.csv"
    _check_out_dir(out_dir, split, resume)
    angles = tuple(dict.fromkeys(float(a) for a in angles))  # each angle once, in order
    stems = _output_stems(records, out_dir, split)
    new_records: list[Record] = []
    failures: list[str] = []
    bar = tqdm(
        list(zip(records, stems)),
        desc=f"augment {split}",
        unit="image",
        disable=None if progress is None else not progress,
    )
    for record, stem in bar:
        outputs = _output_paths(stem, angles)
        image = None
        for angle, path in outputs:
            if path.exists():
                if not resume:
                    raise OutputExistsError(f"{path} exists; it is never replaced")
                sha1 = file_sha1(path)
            else:
                try:
                    if image is None:
                        image = _to_png_array(read_image(record.path, page=page), eight_bit)
                        fill = _background(image)
                except ImageError as exc:
                    failures.append(str(exc))
                    break
                sha1 = _write_png(path, rotate_full(image, angle, fill) if angle else image)
            extra = dict(record.extra, source=str(record.path), angle=f"{angle:g}")
            new_records.append(Record(path, record.label, record.group, record.split, sha1, extra))
    bar.close()
    if not new_records:
        raise ManifestError(
            f"none of the {len(records)} image(s) of split {split!r} could be read:\n"
            + "\n".join(failures[:10])
        )
    write_manifest(new_records, new_manifest, force=resume)
    return new_manifest, failures


# ---- the command -----------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="manifest CSV (from `flystage organise`)")
    parser.add_argument(
        "--split",
        required=True,
        choices=["train", "valid", "test"],
        help="the one split to augment (splits are never mixed)",
    )
    parser.add_argument("--out", required=True, help="output folder (must be empty or new)")
    parser.add_argument(
        "--angles",
        type=float,
        nargs="+",
        default=list(LAB_ANGLES),
        metavar="DEG",
        help="rotations in degrees, counter-clockwise (default: %(default)s)",
    )
    parser.add_argument(
        "--8bit",
        dest="eight_bit",
        action="store_true",
        help="stretch 16-bit and float images to 8-bit PNG (default: keep 16-bit)",
    )
    parser.add_argument("--page", type=int, default=0, help="page of multi-page TIFFs (default 0)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted run in --out: skip outputs that exist",
    )


def run(args: argparse.Namespace) -> int:
    manifest, failures = augment_split(
        args.manifest,
        args.split,
        args.out,
        tuple(args.angles),
        eight_bit=args.eight_bit,
        resume=args.resume,
        page=args.page,
    )
    for message in failures:
        print(f"skipped: {message}", file=sys.stderr)
    print(
        f"wrote {manifest}"
        + (f" ({len(failures)} image(s) skipped, see above)" if failures else "")
    )
    return 1 if failures else 0
