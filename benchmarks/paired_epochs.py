"""Epoch by epoch, how an MoE's validation mAP50-95 moves against the dense model's in one `visionmoe compare` folder.

    python benchmarks/paired_epochs.py /tmp/exp/cmp/synth_stop39 visionmoe-yolo-n yolo11n

Since stop 39 a tied MoE trains exactly as the dense YOLO of the same seed until its experts split, so the two
columns agree to the digit through the dense warmup, and each later row is what routing has added (or cost) by then.
Prints, per seed, the first epoch at which the two differ, then every epoch's MoE-minus-dense delta by seed and its mean.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

COLUMN = "metrics/mAP50-95(B)"


def epoch_maps(run: Path) -> list[float]:
    """mAP50-95 of every epoch of one training run (its results.csv), in order."""
    with open(run / "results.csv", newline="") as f:
        return [float(row[COLUMN]) for row in csv.DictReader(f, skipinitialspace=True)]


def paired(folder: Path, moe: str, dense: str) -> dict[int, tuple[list[float], list[float]]]:
    """{seed: (moe maps, dense maps)} for every seed both models trained in `folder`."""
    seeds = sorted(int(p.name[4:]) for p in (folder / moe).glob("seed*") if p.is_dir())
    runs = {s: (folder / moe / f"seed{s}", folder / dense / f"seed{s}") for s in seeds}
    return {s: (epoch_maps(m), epoch_maps(d)) for s, (m, d) in runs.items() if (d / "results.csv").is_file()}


def first_difference(a: list[float], b: list[float]) -> int | None:
    """1-based epoch at which the two runs' mAP first differs, None where they agree throughout."""
    return next((i + 1 for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def report(pairs: dict[int, tuple[list[float], list[float]]]) -> list[str]:
    seeds = sorted(pairs)
    lines = [f"seed {s}: first differs at epoch {first_difference(*pairs[s])}" for s in seeds]
    lines += ["", "| epoch | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---" * (len(seeds) + 2) + "|"]
    for e in range(min(min(len(m), len(d)) for m, d in pairs.values())):
        deltas = [pairs[s][0][e] - pairs[s][1][e] for s in seeds]
        cells = " | ".join(f"{d:+.4f}" for d in deltas)
        lines.append(f"| {e + 1} | {cells} | {sum(deltas) / len(deltas):+.4f} |")
    return lines


if __name__ == "__main__":
    folder, moe, dense = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    print("\n".join(report(paired(folder, moe, dense))))
