"""`visionmoe MODE key=value ...`: the command line, in the style of `yolo`."""

from __future__ import annotations

import sys
from difflib import get_close_matches
from typing import Any

from ultralytics.cfg import DEFAULT_CFG_DICT, parse_key_value_pair
from ultralytics.utils import ASSETS, LOGGER

from .data.synth import DEFAULT_IMAGES, DEFAULT_IMGSZ, generate
from .engine.benchmark import BENCHMARK_ARGS, benchmark
from .engine.compare import COMPARE_KEYS, DEFAULT_MODELS, compare
from .export import EXPORT_DISPATCHES, EXPORT_KEYS
from .models.yolo.model import DEFAULT_MODEL
from .nn.settings import MoESettings, pop_moe_overrides

MODES = ("train", "val", "predict", "track", "export", "analyze", "compare", "benchmark", "data", "info", "help")
SYNTH_DEFAULTS = {
    "out": "DATASETS_DIR/synth-<objects>",
    "seed": 0,
    "images": DEFAULT_IMAGES,
    "imgsz": DEFAULT_IMGSZ,
    "objects": "shapes",
}
COMPARE_DEFAULTS = {"models": ",".join(DEFAULT_MODELS), "seeds": 3}

HELP = f"""
visionmoe: sparse Mixture-of-Experts detectors on Ultralytics.

  visionmoe MODE [key=value ...]

  MODE       one of {', '.join(MODES)}
  key=value  any Ultralytics argument (epochs=3 imgsz=320 device=cpu ...), plus the MoE settings
             {', '.join(MoESettings.keys())}
             which apply when the model is built from a YAML (default model={DEFAULT_MODEL}), and for export
             moe_dispatch={'|'.join(EXPORT_DISPATCHES)} (auto: the faster sparse form for the batch, see README)

Examples:
  visionmoe train data=coco8.yaml epochs=3 imgsz=320
  visionmoe train model=visionmoe-yolo-s.yaml data=coco8.yaml experts=8 top_k=1
  visionmoe train model=visionmoe-vit-s.yaml data=coco8.yaml capacity_factor=[1.25,2.0] bpr=True
  visionmoe predict model=runs/detect/train/weights/best.pt source=bus.jpg
  visionmoe track model=runs/detect/train/weights/best.pt source=video.mp4 tracker=bytetrack.yaml
  visionmoe val model=runs/detect/train/weights/best.pt data=coco8.yaml
  visionmoe export model=runs/detect/train/weights/best.pt format=onnx
  visionmoe export model=runs/detect/train/weights/best.pt format=openvino   # or torchscript, engine (GPU)
  visionmoe analyze model=runs/detect/train/weights/best.pt data=coco8.yaml   # routing analysis of the val split
  visionmoe info model=visionmoe-yolo-m.yaml
  visionmoe compare data=synth-shapes.yaml models=visionmoe-yolo-n.yaml,yolo11n.yaml epochs=10 imgsz=128 seeds=3
  visionmoe benchmark model=visionmoe-yolo-n.yaml imgsz=640   # every format, side by side with YOLO11n
  visionmoe data synth out=datasets/synth-shapes seed=0 images={DEFAULT_IMAGES} imgsz={DEFAULT_IMGSZ}
  visionmoe data synth objects=glyphs   # 26 letters instead of 6 shapes, same domains: DATASETS_DIR/synth-glyphs
"""


class UsageError(ValueError):
    """A command line that cannot run as written."""


class RunsFailed(RuntimeError):
    """Some runs of a command failed after it started; their failures are recorded in its results."""


def parse_args(argv: list[str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Split `MODE key=value ...` into (mode, Ultralytics overrides, MoE settings); unknown keys fail."""
    if not argv or argv[0] in {"help", "-h", "--help"}:
        return "help", {}, {}
    mode, *pairs = argv
    if mode not in MODES:
        raise UsageError(f"unknown mode '{mode}': use one of {', '.join(MODES)} (see 'visionmoe help')")
    overrides: dict[str, Any] = {}
    valid = [*DEFAULT_CFG_DICT, *MoESettings.keys(), *(EXPORT_KEYS if mode == "export" else ())]
    if mode == "compare":
        valid += COMPARE_KEYS
    if mode == "benchmark":
        valid = [*BENCHMARK_ARGS, *MoESettings.keys()]
    if mode == "data":
        if pairs[:1] != ["synth"]:
            raise UsageError(
                "data needs a tool: 'visionmoe data synth [out=DIR seed=0 images=N imgsz=S objects=shapes|glyphs]'"
            )
        pairs, valid = pairs[1:], list(SYNTH_DEFAULTS)
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"argument '{pair}' is not key=value: write it as e.g. 'epochs=3'")
        key, value = parse_key_value_pair(pair.removeprefix("--"))
        if key not in valid:
            close = get_close_matches(key, valid, n=3)
            hint = f" Similar arguments are {[f'{k}={_default(k, mode)}' for k in close]}." if close else ""
            raise UsageError(
                f"'{key}' is not a valid visionmoe argument.{hint} Valid arguments: {', '.join(sorted(valid))}"
            )
        overrides[key] = value
    return mode, overrides, pop_moe_overrides(overrides) if mode != "data" else {}


def _default(key: str, mode: str) -> Any:
    if mode == "data":
        return SYNTH_DEFAULTS[key]
    if mode == "benchmark" and key in BENCHMARK_ARGS:
        return BENCHMARK_ARGS[key]
    if key in COMPARE_DEFAULTS:
        return COMPARE_DEFAULTS[key]
    if key in EXPORT_KEYS:
        return EXPORT_DISPATCHES[0]
    return DEFAULT_CFG_DICT[key] if key in DEFAULT_CFG_DICT else getattr(MoESettings(), key)


def run(argv: list[str]) -> Any:
    """Run one command; returns what the model method returned."""
    from .models.yolo.model import VisionMoE

    mode, overrides, moe = parse_args(argv)
    if mode == "help":
        LOGGER.info(HELP)
        return None
    if mode == "data":
        return generate(**overrides)
    if mode == "compare":
        rows = compare(moe=moe, **overrides)
        failed = [f"{r['model']} ({r['status']})" for r in rows if r["status"] != "ok"]
        if failed:
            raise RunsFailed(f"compare: failed runs, recorded in compare.md: {'; '.join(failed)}")
        return rows
    if mode == "benchmark":
        return benchmark(**overrides, **moe)
    if mode == "analyze" and "model" not in overrides:
        raise UsageError("analyze needs a trained model: pass model=path/to/best.pt")
    model = VisionMoE(overrides.pop("model", DEFAULT_MODEL), **moe)
    if mode == "info":
        return model.info(imgsz=overrides.get("imgsz", 640))
    if mode in {"predict", "track"}:
        overrides.setdefault("source", ASSETS)
        overrides.setdefault("save", True)  # as `yolo predict`/`yolo track` do; Ultralytics only detects its own CLI
    if mode == "export":
        overrides.setdefault("format", "onnx")
    return getattr(model, mode)(**overrides)


def entrypoint(argv: list[str] | None = None) -> int:
    """Console script: errors a user can fix print as one line and exit 2; runs that failed later exit 1."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError, SyntaxError, RunsFailed) as e:
        message = " ".join(str(e).split())  # one line, whatever the source formatted
        print(f"visionmoe error: {message}", file=sys.stderr)
        return 1 if isinstance(e, RunsFailed) else 2
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint())
