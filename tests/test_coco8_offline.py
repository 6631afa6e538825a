"""The offline COCO8 stand-in that the tests build when the real COCO8 is absent: COCO8's layout, valid labels."""

from __future__ import annotations

from ultralytics.data.utils import verify_image_label
from ultralytics.utils import YAML
from ultralytics.utils.checks import check_yaml

from coco8_offline import PERSON, build_coco8


def test_stand_in_has_coco8_layout_and_valid_labels(tmp_path):
    root = build_coco8(tmp_path / "coco8")
    names = YAML.load(check_yaml("coco8.yaml"))["names"]
    classes = []
    for split in ("train", "val"):
        images = sorted((root / "images" / split).glob("*.jpg"))
        assert len(images) == 4, split  # as COCO8; tests batch the 4 val images
        for image in images:
            label = root / "labels" / split / f"{image.stem}.txt"
            # (im_file, lb_file, prefix, keypoint, num_cls, nkpt, ndim, single_cls); nc is COCO8's 80
            *_, missing, found, empty, corrupt, message = verify_image_label(
                (image, label, "", False, len(names), 0, 0, False)
            )
            assert (missing, found, empty, corrupt) == (0, 1, 0, 0), message
            rows = [line.split() for line in label.read_text().splitlines()]
            assert all(0 < float(v) <= 1 for row in rows for v in row[1:]), label
            classes += [int(row[0]) for row in rows]
    assert {names[c] for c in classes} == {"person", "bus", "tie"} and classes.count(PERSON) > len(classes) / 2
