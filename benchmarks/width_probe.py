"""Where width pays: YOLO11n with one part of the network widened to YOLO11s's channels, as YAMLs for `compare`.

    python benchmarks/width_probe.py out=/tmp/exp/wide
    visionmoe compare data=synth-shapes.yaml models=/tmp/exp/wide/yolo11n-wide-backbone.yaml,\
/tmp/exp/wide/yolo11n-wide-head.yaml seeds=1 epochs=20 imgsz=128 batch=16 nbs=16 workers=1

Each YAML is Ultralytics' own yolo11.yaml at scale n with the output channels of one part's layers doubled (YOLO11n's
width multiple 0.25 times two is YOLO11s's 0.5), every other layer as in YOLO11n: `backbone` (layers 0-10), `early`
(0-4: the stem and the stride-4 and stride-8 blocks), `deep` (5-10: stride 16 and 32, where the MoE blocks of the
backbone sit) and `head` (11-22, so the Detect head reads YOLO11s's widths too). Dense models, not MoE: they tell
which part's width buys the accuracy that YOLO11s has over YOLO11n on a dataset (benchmarks/results/recipe.md, stop
33), which an MoE cannot buy at YOLO11n's active FLOPs when it lies in the width of the feature maps themselves.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from ultralytics.nn.tasks import yaml_model_load

PARTS = {"backbone": range(0, 11), "early": range(0, 5), "deep": range(5, 11), "head": range(11, 23)}
WIDENED = {"Conv", "C3k2", "SPPF", "C2PSA"}  # the layers whose first argument is their output channels


def widened_yaml(part: str) -> dict:
    """yolo11.yaml at scale n, with the output channels of `part`'s layers doubled."""
    d = yaml_model_load("yolo11n.yaml")
    depth, width, _ = d["scales"]["n"]
    d["scales"] = {"n": [depth, width, 2048]}  # 1024 would cap the doubled deep layers below YOLO11s's widths
    layers = d["backbone"] + d["head"]
    for i in PARTS[part]:
        if layers[i][2] in WIDENED:
            layers[i][3] = [2 * layers[i][3][0], *layers[i][3][1:]]
    return {k: v for k, v in d.items() if k != "yaml_file"}


def to_text(d: dict) -> str:
    """The YAML with one layer per line, as Ultralytics writes its model files."""
    d = dict(d)
    layers = {key: d.pop(key) for key in ("backbone", "head")}
    text = yaml.safe_dump(d, sort_keys=False, default_flow_style=None)
    for key, rows in layers.items():
        text += f"{key}:\n" + "".join(f"  - {yaml.safe_dump(row, default_flow_style=True)}" for row in rows)
    return text


def write(out: str | Path) -> list[Path]:
    """Write yolo11n-wide-<part>.yaml for every part into `out`; the name keeps Ultralytics' scale guess at n."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in PARTS:
        path = out / f"yolo11n-wide-{part}.yaml"
        path.write_text(to_text(widened_yaml(part)))
        paths.append(path)
    return paths


if __name__ == "__main__":
    args = dict(arg.split("=", 1) for arg in sys.argv[1:])
    print("\n".join(str(p) for p in write(args.get("out", "wide_yolo11n"))))
