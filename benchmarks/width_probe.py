"""Where width pays: YOLO11n with parts of the network widened or narrowed, as YAMLs for `visionmoe compare`.

    python benchmarks/width_probe.py out=/tmp/exp/wide
    visionmoe compare data=synth-shapes.yaml models=/tmp/exp/wide/yolo11n-wide-backbone.yaml,\
/tmp/exp/wide/yolo11n-wide-head.yaml seeds=1 epochs=20 imgsz=128 batch=16 nbs=16 workers=1

writes Ultralytics' own yolo11.yaml at scale n with the output channels of one part's layers doubled (YOLO11n's width
multiple 0.25 times two is YOLO11s's 0.5), every other layer as in YOLO11n: `backbone` (layers 0-10), `early` (0-4:
the stem and the stride-4 and stride-8 blocks), `deep` (5-10: stride 16 and 32, where the MoE blocks of the backbone
sit) and `head` (11-22, so the Detect head reads YOLO11s's widths too). These tell which part's width buys the
accuracy that YOLO11s has over YOLO11n on a dataset (benchmarks/results/recipe.md, stop 33).

    python benchmarks/width_probe.py out=/tmp/exp/wide early=1.5 deep=0.6875 head=0.6875 name=realloc

writes a pair with each named part's channels times its factor: yolo11n-realloc.yaml (dense) and
visionmoe-yolo-realloc.yaml (the default MoE YAML at the same widths, trained as visionmoe-yolo-realloc-n.yaml), to
compare a dense trunk whose FLOPs are spent elsewhere than YOLO11n's with the MoE built on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from ultralytics.nn.tasks import yaml_model_load
from ultralytics.utils import YAML

from visionmoe.nn.tasks import find_model_yaml

PARTS = {"backbone": range(0, 11), "early": range(0, 5), "deep": range(5, 11), "head": range(11, 23)}
WIDENED = {"Conv", "C3k2", "MoEC3k2", "SPPF", "C2PSA"}  # the layers whose first argument is their output channels


def scaled_yaml(factors: dict[str, float], moe: bool = False) -> dict:
    """yolo11.yaml (visionmoe-yolo.yaml with `moe`) at scale n, with the output channels of each part's layers times
    its factor (channels rounded to Ultralytics' multiple of 8 at width 0.25)."""
    d = YAML.load(find_model_yaml("visionmoe-yolo.yaml")[0]) if moe else yaml_model_load("yolo11n.yaml")
    depth, width, _ = d["scales"]["n"]
    d["scales"] = {"n": [depth, width, 2048]}  # 1024 would cap the doubled deep layers below YOLO11s's widths
    layers = d["backbone"] + d["head"]
    for part, factor in factors.items():
        for i in PARTS[part]:
            if layers[i][2] in WIDENED:
                layers[i][3] = [max(32, round(layers[i][3][0] * factor / 32) * 32), *layers[i][3][1:]]
    return {k: v for k, v in d.items() if k != "yaml_file"}


def to_text(d: dict) -> str:
    """The YAML with one layer per line, as Ultralytics writes its model files."""
    d = dict(d)
    layers = {key: d.pop(key) for key in ("backbone", "head")}
    text = ""
    for key, value in d.items():  # scales as [depth, width, max_channels] rows, the moe settings one per line
        text += yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=None if key == "scales" else False)
    for key, rows in layers.items():
        text += f"{key}:\n" + "".join(f"  - {yaml.safe_dump(row, default_flow_style=True)}" for row in rows)
    return text


def write(out: str | Path, factors: dict[str, float] | None = None, name: str = "scaled") -> list[Path]:
    """Write yolo11n-wide-<part>.yaml for every part into `out` or, given `factors`, the dense and MoE pair
    yolo11n-<name>.yaml and visionmoe-yolo-<name>.yaml (train the MoE as visionmoe-yolo-<name>-n.yaml). The yolo11n
    prefix keeps Ultralytics' scale guess at n."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if factors:
        models = {f"yolo11n-{name}": scaled_yaml(factors), f"visionmoe-yolo-{name}": scaled_yaml(factors, moe=True)}
    else:
        models = {f"yolo11n-wide-{part}": scaled_yaml({part: 2.0}) for part in PARTS}  # YOLO11s's widths
    paths = []
    for stem, d in models.items():
        path = out / f"{stem}.yaml"
        path.write_text(to_text(d))
        paths.append(path)
    return paths


if __name__ == "__main__":
    args = dict(arg.split("=", 1) for arg in sys.argv[1:])
    factors = {part: float(args[part]) for part in PARTS if part in args}
    paths = write(args.get("out", "wide_yolo11n"), factors, args.get("name", "scaled"))
    print("\n".join(str(p) for p in paths))
