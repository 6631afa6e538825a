"""An offline stand-in for COCO8, built from the two images that the ultralytics wheel ships.

Same layout and class ids as COCO8 (images/ and labels/ with 4 train and 4 val images, YOLO labels in the 80 COCO
classes), so `data=coco8.yaml` resolves to it. The boxes were drawn by hand on the original assets; each variant
crops, mirrors and resizes an asset and its boxes alike. Nothing here imports ultralytics: the test session builds
this before ultralytics may be imported (see conftest.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

PERSON, BUS, TIE = 0, 5, 27  # COCO class ids, as in ultralytics' coco8.yaml
BOXES = {  # (class, x1, y1, x2, y2) in pixels of the original asset
    "bus.jpg": [  # 810 x 1080
        (BUS, 17, 230, 805, 740),
        (PERSON, 50, 398, 245, 905),
        (PERSON, 222, 405, 345, 860),
        (PERSON, 668, 385, 810, 880),
        (PERSON, 0, 550, 80, 875),
    ],
    "zidane.jpg": [  # 1280 x 720
        (PERSON, 122, 198, 1152, 720),
        (PERSON, 750, 40, 1142, 720),
        (TIE, 437, 435, 515, 720),
    ],
}
# (split, stem, asset, crop x1 y1 x2 y2 or None, mirrored, longest side, grey); every crop holds every box whole
VARIANTS = (
    ("train", "bus", "bus.jpg", None, False, 640, False),
    ("train", "zidane", "zidane.jpg", None, False, 640, False),
    ("train", "bus-mirrored", "bus.jpg", None, True, 576, False),
    ("train", "zidane-crop", "zidane.jpg", (100, 0, 1180, 720), False, 640, False),
    ("val", "bus-crop", "bus.jpg", (0, 200, 810, 940), False, 640, False),
    ("val", "zidane-mirrored", "zidane.jpg", None, True, 640, False),
    ("val", "bus-grey", "bus.jpg", (0, 100, 810, 1000), True, 512, True),
    ("val", "zidane-grey", "zidane.jpg", (80, 20, 1200, 720), False, 512, True),
)


def ultralytics_assets() -> Path:
    """The wheel's assets folder, found without importing ultralytics."""
    return Path(importlib.util.find_spec("ultralytics").submodule_search_locations[0]) / "assets"


def build_coco8(dest: Path) -> Path:
    """Write the stand-in COCO8 to `dest` (images/{train,val}, labels/{train,val}) and return `dest`."""
    assets = ultralytics_assets()
    for split, stem, asset, crop, mirrored, size, grey in VARIANTS:
        image = cv2.imread(str(assets / asset))
        x0, y0, x1, y1 = crop or (0, 0, image.shape[1], image.shape[0])
        image = image[y0:y1, x0:x1]
        w, h = x1 - x0, y1 - y0
        boxes = np.array([b[1:] for b in BOXES[asset]], dtype=float) - (x0, y0, x0, y0)
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all(), stem
        if mirrored:
            image, boxes[:, [0, 2]] = image[:, ::-1], w - boxes[:, [2, 0]]
        scale = size / max(w, h)
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        if grey:
            image = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
        xywh = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h,
                         (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h], 1)  # fmt: skip
        for folder in ("images", "labels"):
            (dest / folder / split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(dest / "images" / split / f"{stem}.jpg"), image)
        lines = (f"{b[0]} " + " ".join(f"{v:.6f}" for v in row) for b, row in zip(BOXES[asset], xywh))
        (dest / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return dest
