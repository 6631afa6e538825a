"""Synthetic multi-domain detection set: OpenCV shapes or letters under albumentations domain effects, for a CPU.

Each image shows 1-4 non-overlapping objects in one visual domain: 6 shapes (`objects='shapes'`, the default), or
26 capital letters (`objects='glyphs'`: a harder set, with many classes and fewer examples of each). The domain of
image i is DOMAINS[i % len(DOMAINS)], so every split holds every domain in equal shares. All randomness of image i
comes from generators seeded by (seed, i), so the same arguments give byte-identical files in any order and on any
run.

Layout under `out` (the data YAML has no `path:`, so Ultralytics takes its folder as the dataset root):
    images/{train,val}/NNNNN.jpg, labels/{train,val}/NNNNN.txt (YOLO), domains.csv (image stem, domain),
    synth-<objects>.yaml (references domains.csv through `domains:`, as `visionmoe analyze` reads it).
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import cv2
import numpy as np
from ultralytics.utils import DATASETS_DIR, LOGGER, TQDM, YAML

from ..analysis.domains import DOMAINS_FILE

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would otherwise query PyPI on import
import albumentations as A  # noqa: E402

NAME = "synth-shapes"
CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
GLYPHS = tuple(string.ascii_uppercase)
OBJECTS = {"shapes": CLASSES, "glyphs": GLYPHS}  # the object families: `objects` -> class names
GLYPH_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX)  # built into OpenCV: nothing to download
DOMAINS = ("clean", "noisy", "blurred", "lowlight", "cluttered", "colourshift")
# Domains of like looks share an expert of the 4-expert default models under domain routing (`domain_loss`).
DOMAIN_EXPERTS = {"clean": 0, "colourshift": 0, "cluttered": 1, "noisy": 2, "lowlight": 2, "blurred": 3}
DEFAULT_IMAGES = 1200
DEFAULT_IMGSZ = 160
VAL_FRACTION = 0.2
JPEG_QUALITY = 95
MAX_OBJECTS = 4


def domain_transform(domain: str, seed: int) -> A.Compose | None:
    """Seeded albumentations pipeline of one domain's visual effect (None for clean and cluttered images,
    whose clutter is drawn into the background)."""
    effects = {
        "noisy": [A.GaussNoise(std_range=(0.12, 0.25), p=1)],
        "blurred": [
            A.OneOf([A.GaussianBlur(blur_limit=(5, 9), sigma_limit=(1.5, 2.5)), A.MotionBlur(blur_limit=(7, 11))], p=1)
        ],
        "lowlight": [
            A.RandomGamma(gamma_limit=(200, 300), p=1),  # darkens mid-tones most, as underexposure does
            A.RandomBrightnessContrast(brightness_limit=(-0.1, 0.0), contrast_limit=(-0.5, -0.3), p=1),
            A.GaussNoise(std_range=(0.02, 0.05), p=1),  # sensor noise, which low light makes visible
        ],
        "colourshift": [
            A.HueSaturationValue(hue_shift_limit=(-90, 90), sat_shift_limit=(20, 50), val_shift_limit=0, p=1),
            A.RGBShift(r_shift_limit=40, g_shift_limit=40, b_shift_limit=40, p=1),
        ],
    }
    return A.Compose(effects[domain], seed=seed) if domain in effects else None


def _polygon(kind: str, r: float, angle: float) -> np.ndarray:
    """Vertices [N, 2] of a shape of circumradius r around the origin, rotated by angle (radians)."""
    if kind == "square":
        t = np.arange(4) * np.pi / 2 + np.pi / 4
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif kind == "triangle":
        t = np.arange(3) * 2 * np.pi / 3 - np.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif kind == "star":
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * radii[:, None]
    else:  # cross: a plus sign whose arms reach r and are 0.5 r wide
        a, w = r / np.sqrt(1.0625), 0.25 * r / np.sqrt(1.0625)  # arm tips (a, +-w) lie on the circumcircle
        pts = np.array([(w, w), (a, w), (a, -w), (w, -w), (w, -a), (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w),
                        (-w, a), (w, a)])  # fmt: skip
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _draw_shape(img: np.ndarray, kind: str, cx: float, cy: float, r: float, angle: float, colour: tuple) -> np.ndarray:
    """Draw one shape; returns its tight box (x1, y1, x2, y2) in pixels."""
    if kind in ("circle", "ring"):
        thickness = -1 if kind == "circle" else max(2, round(0.3 * r))
        radius = r if kind == "circle" else r - thickness / 2  # the ring's outer edge lies at r, like the circle's
        cv2.circle(img, (round(cx), round(cy)), round(radius), colour, thickness, cv2.LINE_AA)
        return np.array([cx - r, cy - r, cx + r, cy + r])
    pts = _polygon(kind, r, angle) + (cx, cy)
    cv2.fillPoly(img, [np.round(pts * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)  # 4 bits subpixel
    return np.concatenate([pts.min(0), pts.max(0)])


def _draw_glyph(
    img: np.ndarray, char: str, cx: float, cy: float, r: float, angle: float, colour: tuple, font: int
) -> np.ndarray:
    """Draw one letter, rotated by angle (radians), inside the circle of radius r; returns its tight box in pixels."""
    (w, h), base = cv2.getTextSize(char, font, 1.0, 2)
    scale = 2 * r / np.hypot(w, h + base)  # the text box's diagonal spans the circle, so any rotation stays inside
    thickness = max(1, round(2.2 * scale))
    (w, h), base = cv2.getTextSize(char, font, scale, thickness)
    pad = int(r) + 1  # the mask square lies inside the image, as the circle does (render keeps r + 1 from the edges)
    mask = np.zeros((2 * pad, 2 * pad), np.uint8)
    cv2.putText(mask, char, (pad - w // 2, pad + (h - base) // 2), font, scale, 255, thickness, cv2.LINE_AA)
    mask = cv2.warpAffine(mask, cv2.getRotationMatrix2D((pad, pad), np.degrees(angle), 1.0), mask.shape[::-1])
    x0, y0 = round(cx) - pad, round(cy) - pad
    alpha = mask[..., None].astype(np.float32) / 255
    region = img[y0 : y0 + 2 * pad, x0 : x0 + 2 * pad]
    region[:] = (region * (1 - alpha) + np.array(colour, np.float32) * alpha).round().astype(np.uint8)
    ys, xs = np.nonzero(mask > 127)
    return np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], dtype=np.float64)


def _background(rng: np.random.Generator, size: int, cluttered: bool) -> np.ndarray:
    """A smooth two-colour gradient, or for cluttered images a blotchy texture crossed by random lines."""
    a, b = rng.integers(0, 256, (2, 3))
    ramp = np.linspace(0, 1, size)[:, None, None]
    img = (a + (b - a) * ramp) * np.ones((size, size, 1))
    if rng.random() < 0.5:  # horizontal gradient
        img = img.transpose(1, 0, 2)
    if cluttered:
        blotches = cv2.resize(rng.uniform(-70, 70, (8, 8, 3)), (size, size), interpolation=cv2.INTER_CUBIC)
        img = img + blotches + rng.normal(0, 12, (size, size, 3))
    img = np.ascontiguousarray(img.clip(0, 255).astype(np.uint8))
    if cluttered:  # thin lines and arcs: edges that are not objects
        for _ in range(int(rng.integers(8, 16))):
            p1, p2 = rng.integers(0, size, (2, 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.line(img, tuple(map(int, p1)), tuple(map(int, p2)), colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def render(
    index: int, seed: int = 0, imgsz: int = DEFAULT_IMGSZ, objects: str = "shapes"
) -> tuple[np.ndarray, np.ndarray, str]:
    """Image `index` of the set: (BGR uint8 [imgsz, imgsz, 3], labels [n, 5] as class cx cy w h normalised, domain)."""
    names = OBJECTS[objects]
    rng = np.random.default_rng([seed, index])
    domain = DOMAINS[index % len(DOMAINS)]
    img = _background(rng, imgsz, domain == "cluttered")
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _attempt in range(20):  # rejection sampling keeps shapes apart, so every box shows one whole object
            r = rng.uniform(0.07, 0.17) * imgsz
            cx, cy = rng.uniform(r + 1, imgsz - r - 1, 2)
            if all(abs(cx - x) > r + ro + 2 or abs(cy - y) > r + ro + 2 for x, y, ro in boxes):
                break
        else:
            continue
        cls = int(rng.integers(len(names)))
        # a colour far from the local background keeps the object visible before the domain effect degrades it
        local = img[int(cy - r) : int(cy + r), int(cx - r) : int(cx + r)].reshape(-1, 3).mean(0)
        colour = rng.integers(0, 256, 3)
        while np.abs(colour - local).sum() < 180:
            colour = rng.integers(0, 256, 3)
        colour = tuple(int(c) for c in colour)
        if objects == "glyphs":  # upright within 25 degrees, so that letters keep their identity (M is no W)
            font = GLYPH_FONTS[int(rng.integers(len(GLYPH_FONTS)))]
            box = _draw_glyph(img, names[cls], cx, cy, r, rng.uniform(-0.44, 0.44), colour, font)
        else:
            box = _draw_shape(img, names[cls], cx, cy, r, rng.uniform(0, 2 * np.pi), colour)
        boxes.append((cx, cy, r))
        x1, y1, x2, y2 = box.clip(0, imgsz) / imgsz
        labels.append((cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1))
    transform = domain_transform(domain, int(rng.integers(2**31)))
    if transform is not None:
        img = transform(image=img)["image"]
    return img, np.array(labels, dtype=np.float64).reshape(-1, 5), domain


def generate(
    out: str | Path | None = None,
    seed: int = 0,
    images: int = DEFAULT_IMAGES,
    imgsz: int = DEFAULT_IMGSZ,
    objects: str = "shapes",
) -> Path:
    """Write the set to `out` (default: DATASETS_DIR/synth-<objects>) and return the path of its data YAML."""
    if not (isinstance(images, int) and images >= 2 and isinstance(imgsz, int) and imgsz >= 32):
        raise ValueError(f"synth needs images >= 2 and imgsz >= 32 (integers), got images={images!r} imgsz={imgsz!r}")
    if objects not in OBJECTS:
        raise ValueError(f"synth objects={objects!r} is not a family: use one of {', '.join(OBJECTS)}")
    name = f"synth-{objects}"
    out = Path(out or DATASETS_DIR / name)
    n_val = max(1, round(images * VAL_FRACTION))
    rows = ["image,domain"]
    for i in TQDM(range(images), desc=f"{name} -> {out}"):
        split = "train" if i < images - n_val else "val"
        img, labels, domain = render(i, seed, imgsz, objects)
        stem = f"{i:05d}"
        for folder in ("images", "labels"):
            (out / folder / split).mkdir(parents=True, exist_ok=True)
        _, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        (out / "images" / split / f"{stem}.jpg").write_bytes(jpg.tobytes())
        lines = [f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, x, y, w, h in labels]
        (out / "labels" / split / f"{stem}.txt").write_text("".join(f"{line}\n" for line in lines))
        rows.append(f"{stem},{domain}")
    (out / DOMAINS_FILE).write_text("\n".join(rows) + "\n")
    yaml_file = out / f"{name}.yaml"
    YAML.save(yaml_file, data_yaml(seed, images, imgsz, objects))
    LOGGER.info(f"{name}: {images} images ({images - n_val} train, {n_val} val), {imgsz} px, seed {seed}: {yaml_file}")
    return yaml_file


def data_yaml(seed: int, images: int, imgsz: int, objects: str = "shapes") -> dict:
    """The data YAML of a generated set (no `path:`, so the YAML's folder is the root)."""
    return {
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(OBJECTS[objects])),
        "domains": DOMAINS_FILE,
        "domain_experts": dict(DOMAIN_EXPERTS),
        "synth": {"seed": seed, "images": images, "imgsz": imgsz, "objects": objects, "domains": list(DOMAINS)},
    }
