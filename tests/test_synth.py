"""The synthetic multi-domain benchmark set: deterministic bytes, valid YOLO labels, domain tags, CLI."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ultralytics.data.utils import check_det_dataset

from visionmoe.analysis.domains import load_domains
from visionmoe.data import find_data_yaml
from visionmoe.data.synth import CLASSES, DOMAINS, GLYPH_FONTS, GLYPHS, OBJECTS, _draw_glyph, generate

from conftest import run_cli


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate(tmp_path / name, seed=seed, images=12, imgsz=64)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert len(a) == 2 * 12 + 2  # images, labels, domains.csv, data YAML
    assert a == b
    assert a.keys() == c.keys() and any(a[k] != c[k] for k in a if k.endswith(".jpg"))


@pytest.mark.parametrize("objects", OBJECTS)
def test_labels_domains_and_yaml_are_valid(tmp_path, objects):
    yaml_file = generate(tmp_path / "s", images=24, imgsz=96, objects=objects)
    assert yaml_file.name == f"synth-{objects}.yaml"
    data = check_det_dataset(str(yaml_file))
    names = OBJECTS[objects]
    assert data["nc"] == len(names) and list(data["names"].values()) == list(names)
    images = sorted(Path(data["train"]).glob("*.jpg")) + sorted(Path(data["val"]).glob("*.jpg"))
    assert len(images) == 24 and len(list(Path(data["val"]).glob("*.jpg"))) == 5  # 20 % val
    boxes = 0
    for img in images:
        lines = (img.parents[2] / "labels" / img.parent.name / f"{img.stem}.txt").read_text().splitlines()
        assert 1 <= len(lines) <= 4
        for line in lines:
            c, x, y, w, h = line.split()
            assert 0 <= int(c) < len(names)
            x, y, w, h = map(float, (x, y, w, h))
            assert 0 < w <= 1 and 0 < h <= 1 and 0 <= x - w / 2 and x + w / 2 <= 1 and 0 <= y - h / 2 and y + h / 2 <= 1
            boxes += 1
    assert boxes >= 24
    domains = load_domains(data)  # the reader `visionmoe analyze` uses
    assert set(domains) == {img.stem for img in images}
    assert Counter(domains.values()) == dict.fromkeys(DOMAINS, 4)  # every domain, in equal shares


@pytest.mark.parametrize("font", GLYPH_FONTS)
def test_glyphs_stay_in_their_circle_and_boxes_are_tight(font):
    """render keeps objects apart by their circles of radius r, so a letter at any allowed angle must stay inside."""
    for i, (char, angle) in enumerate(itertools.product(GLYPHS, (-0.44, 0.0, 0.44))):
        r, cx, cy = 9.0 + i % 13, 40.3, 38.7
        img = np.zeros((80, 80, 3), np.uint8)
        box = _draw_glyph(img, char, cx, cy, r, angle, (255, 255, 255), font)
        ys, xs = np.nonzero(img[..., 0] > 127)  # pixels more than half covered by the letter
        assert np.hypot(xs + 0.5 - round(cx), ys + 0.5 - round(cy)).max() <= r + 1, (char, angle)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], (char, angle)


def test_cli_data_synth_and_packaged_yaml(tmp_path):
    r = run_cli("data", "synth", f"out={tmp_path / 'd'}", "images=6", "imgsz=64", "seed=3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "d" / "synth-shapes.yaml").is_file() and len(list((tmp_path / "d").rglob("*.jpg"))) == 6
    r = run_cli("data", "synth", f"out={tmp_path / 'l'}", "objects=letters")
    assert r.returncode == 2 and "objects='letters'" in r.stderr and "shapes, glyphs" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "l").exists()
    r = run_cli("data", "synth", "image=6")
    assert r.returncode == 2 and "'image' is not a valid" in r.stderr and "images=" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    packaged = Path(find_data_yaml("synth-shapes.yaml"))
    assert packaged.is_file() and "generate(" in packaged.read_text()


def test_conflict_set_relabels_by_domain_group(tmp_path, monkeypatch):
    """benchmarks/conflict_set.py (recipe.md, stop 24): same images, each label shifted by its image's domain group."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from conflict_set import make_conflict_set
    from visionmoe.data.synth import DOMAIN_EXPERTS

    source = generate(tmp_path / "s", images=12, imgsz=64).parent
    yaml_file = make_conflict_set(source, tmp_path / "c")
    data = check_det_dataset(str(yaml_file))
    assert data["nc"] == len(CLASSES)
    domains = load_domains(data)
    labels = sorted(source.glob("labels/*/*.txt"))
    assert len(labels) == 12 and set(domains) == {p.stem for p in labels}
    for original in labels:
        relabelled = tmp_path / "c" / original.relative_to(source)
        shift = DOMAIN_EXPERTS[domains[original.stem]]
        for a, b in zip(original.read_text().splitlines(), relabelled.read_text().splitlines(), strict=True):
            (ca, *box_a), (cb, *box_b) = a.split(), b.split()
            assert int(cb) == (int(ca) + shift) % len(CLASSES) and box_a == box_b
    for image in source.glob("images/*/*.jpg"):
        assert (tmp_path / "c" / image.relative_to(source)).read_bytes() == image.read_bytes()
    assert {DOMAIN_EXPERTS[d] for d in domains.values()} == {0, 1, 2, 3}  # every group, so every shift, is tested
    with pytest.raises(FileExistsError, match="exists; remove it"):
        make_conflict_set(source, tmp_path / "c")
