"""Ablation of the pretrained linear probe: leave-one-gene-out on BDGP images (docs/accuracy.md).

Cheap by design: for each (backbone, input size, colour) the features of every image are
computed once with the toolkit's own preprocessing and
:class:`flystage.training.backbones.LiteFeatures`, then each fold fits
:func:`flystage.training.probe.fit_logistic` on the other genes' standardised features (every
training gene, fixed L2: a proxy for the toolkit's probe, which also holds out genes to
calibrate). Prints one JSON line per setting: top1, top3, seconds.

    python bench/ablation_pretrained.py [--archs efficientnet_lite0,...] [--sizes 128x320,...]
        [--grey auto,luminance,rgb] [--taps 6 4,6 2,4,6] [--l2 0.01,0.1] [--data lablike-dir]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import DATA, read_by_gene
from flystage.evaluate import topk_accuracy
from flystage.imaging import PreprocessConfig
from flystage.manifest import sort_labels
from flystage.training.backbones import LiteFeatures
from flystage.training.data import ImageCache
from flystage.training.hog import HOGFeatures
from flystage.training.probe import extract, fit_logistic, standardise


def logo(
    features: torch.Tensor,
    targets: np.ndarray,
    groups: np.ndarray,
    k: int,
    l2: float,
    extra: torch.Tensor | None = None,
) -> np.ndarray:
    """Pooled held-out probabilities ``(N, K)`` of one probe per held-out group."""
    probs = np.zeros((len(targets), k))
    y = torch.as_tensor(targets)
    for group in np.unique(groups):
        test, train = groups == group, groups != group
        xtr, xte = standardise(features[train], features[test])
        counts = torch.bincount(y[train], minlength=k).double()
        w, b = fit_logistic(xtr, y[train], k, l2, 1.0 / counts[y[train]])
        probs[test] = torch.softmax(xte @ w.T + b, 1).double().numpy()
    return probs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="efficientnet_lite0")
    parser.add_argument("--sizes", default="128x320")
    parser.add_argument("--grey", default="auto", help="grey_from values, or rgb for 3 channels")
    parser.add_argument(
        "--taps", nargs="+", default=["2,4,6"], help="stage lists; add h for the head conv"
    )
    parser.add_argument("--l2", default="0.1")
    parser.add_argument(
        "--hog", action="store_true", help="also each setting with the HOG features concatenated"
    )
    parser.add_argument(
        "--vflip",
        action="store_true",
        help="also each setting with features averaged over an up-down flip",
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--save-probs",
        type=Path,
        help="also save each setting's pooled held-out probabilities (.npy) here",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("THREADS", "0")) or torch.get_num_threads())

    records = read_by_gene(args.data)
    labels = sort_labels({r.label for r in records})
    targets = np.array([labels.index(r.label) for r in records])
    groups = np.array([r.group for r in records])
    paths = [r.path for r in records]
    for arch, size, grey in itertools.product(
        args.archs.split(","), args.sizes.split(","), args.grey.split(",")
    ):
        h, w = map(int, size.split("x"))
        config = PreprocessConfig(
            height=h,
            width=w,
            channels=3 if grey == "rgb" else 1,
            grey_from="auto" if grey == "rgb" else grey,
        )
        t0 = time.perf_counter()
        images = ImageCache(config, workers=2).get(paths)
        all_taps = LiteFeatures(arch, taps=tuple(range(7)), head=True)
        feats = extract(all_taps, images)
        if args.vflip:
            flipped = extract(all_taps, np.ascontiguousarray(images[:, :, ::-1, :]))
        widths = [
            stage[-1].bn2.num_features
            if not hasattr(stage[-1], "bn3")
            else stage[-1].bn3.num_features
            for stage in all_taps.blocks
        ]
        offsets = np.cumsum([0] + widths + [1280])
        hog = HOGFeatures()(torch.from_numpy(images).float() / 255).flatten(1) if args.hog else None
        seconds_features = time.perf_counter() - t0
        for taps, l2 in itertools.product(args.taps, args.l2.split(",")):
            parts = taps.split(",")
            cols = [
                slice(offsets[int(p)], offsets[int(p) + 1])
                if p != "h"
                else slice(offsets[7], offsets[8])
                for p in parts
            ]
            variants = [("", torch.cat([feats[:, c] for c in cols], 1))]
            if args.vflip:
                variants.append(
                    (
                        "+vflip-avg",
                        (variants[0][1] + torch.cat([flipped[:, c] for c in cols], 1)) / 2,
                    )
                )
            if hog is not None:
                variants += [(name + "+hog", torch.cat([x, hog], 1)) for name, x in list(variants)]
            for name, x in variants:
                t1 = time.perf_counter()
                probs = logo(x, targets, groups, len(labels), float(l2))
                if args.save_probs:
                    args.save_probs.mkdir(parents=True, exist_ok=True)
                    np.save(args.save_probs / "targets.npy", targets)
                    np.save(args.save_probs / f"{arch}-{size}-{grey}-{taps}{name}-{l2}.npy", probs)
                print(
                    json.dumps(
                        {
                            "arch": arch,
                            "input": f"{config.channels}x{h}x{w}",
                            "grey": grey,
                            "taps": taps + name,
                            "dim": x.shape[1],
                            "l2": float(l2),
                            "top1": round(topk_accuracy(probs, targets, 1), 3),
                            "top3": round(topk_accuracy(probs, targets, 3), 3),
                            "seconds_features": round(seconds_features, 1),
                            "seconds_fit": round(time.perf_counter() - t1, 1),
                        }
                    ),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
