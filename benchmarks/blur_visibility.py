"""Diagnostic: is a synth set's blur still visible at a training size? Laplacian variance per domain.

    python benchmarks/blur_visibility.py /tmp/exp/datasets/synth-shapes [--sizes 160 128] [--domains clean blurred]

Under `domain_loss` no image ever reached the blurred group's expert (benchmarks/results/recipe.md, stop 25). This
prints, per image size and domain, percentiles of the variance of the Laplacian of the train images (grey, resized
as training does), a plain measure of fine detail: if the blurred domain's values separate from the clean one's,
the pixels carry the blur and the routers (which read features at strides 8 to 32) miss it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from visionmoe.analysis.domains import DOMAINS_FILE, read_domain_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a synth set's folder (images/train, domains.csv)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 128])
    parser.add_argument("--domains", nargs="+", default=["clean", "colourshift", "blurred"])
    args = parser.parse_args()
    tags = read_domain_csv(args.root / DOMAINS_FILE)
    images = [f for f in sorted((args.root / "images" / "train").glob("*.jpg")) if tags.get(f.stem) in args.domains]
    print("Laplacian variance of the train images, percentiles 5 25 50 75 95")
    for size in args.sizes:
        values: dict[str, list[float]] = {d: [] for d in args.domains}
        for f in images:
            grey = cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (size, size), interpolation=cv2.INTER_AREA)
            values[tags[f.stem]].append(cv2.Laplacian(grey, cv2.CV_64F).var())
        for domain, v in values.items():
            cells = " ".join(f"{x:7.1f}" for x in np.percentile(v, [5, 25, 50, 75, 95]))
            print(f"  {size} px {domain:<12} {len(v):4d} images {cells}")


if __name__ == "__main__":
    main()
