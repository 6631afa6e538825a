"""Diagnostic set: a synth set whose labels depend on the domain, so that specialising by domain pays.

    visionmoe data synth out=/tmp/exp/datasets/synth-shapes
    python benchmarks/conflict_set.py /tmp/exp/datasets/synth-shapes /tmp/exp/datasets/synth-conflict

On synth-shapes every domain needs the same detector (a circle is a circle in every look), and even oracle domain
routing buys the MoE nothing there (benchmarks/results/recipe.md). This copies a synth set and relabels each object
by its image's domain group, the synth YAML's `domain_experts` (`visionmoe.data.synth.DOMAIN_EXPERTS`), which the
oracle and `domain_loss` route by: in group g, shape s gets label (s + g) mod 6. One
shape thus has four labels across the groups, as one object class can carry different names in merged datasets, and
a detector must tell the group from the look of the image to name it. A dense model has to fit four label maps into
one network; a per-image MoE can give each group its own expert. Images and domains.csv are copied unchanged.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ultralytics.utils import YAML

from visionmoe.analysis.domains import DOMAINS_FILE, read_domain_csv
from visionmoe.data.synth import CLASSES, DOMAIN_EXPERTS, NAME


def relabel(line: str, group: int) -> str:
    cls, *box = line.split()
    return " ".join([str((int(cls) + group) % len(CLASSES)), *box])


def make_conflict_set(source: Path, out: Path) -> Path:
    """Copy `source` (a `visionmoe data synth` folder) to `out` with domain-group labels; returns the data YAML."""
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or pass another output folder")
    domains = read_domain_csv(source / DOMAINS_FILE)
    shutil.copytree(source / "images", out / "images")
    shutil.copy(source / DOMAINS_FILE, out / DOMAINS_FILE)
    for label_file in (source / "labels").glob("*/*.txt"):
        group = DOMAIN_EXPERTS[domains[label_file.stem]]
        lines = label_file.read_text().splitlines()
        target = out / "labels" / label_file.parent.name / label_file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(relabel(line, group) + "\n" for line in lines if line.strip()))
    data = YAML.load(source / f"{NAME}.yaml")
    data["names"] = {i: f"label{i}" for i in range(len(CLASSES))}
    data["conflict"] = {"source": str(source), "label": "(shape + group) mod 6", "groups": DOMAIN_EXPERTS}
    YAML.save(out / f"{NAME}.yaml", data)
    return out / f"{NAME}.yaml"


if __name__ == "__main__":
    print(make_conflict_set(Path(sys.argv[1]), Path(sys.argv[2])))
