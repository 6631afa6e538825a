"""TensorRT FP16 engines of dense YOLO11 and visionmoe-yolo (each sparse export form), timed side by side on a GPU.

    python benchmarks/tensorrt.py [--imgsz 640] [--scale n] [--experts 4 16] [--runs 200] [--warmup 20] [--device 0]

Builds the engines through `export(format="engine", half=True)` (visionmoe's export goes through its checked
static ONNX), then times each at batch 1 beside the YOLO11 engine alone, interleaved, in 3 child processes per pair
(visionmoe/utils/latency.py). Prints each engine's median and MoE / YOLO11 per form (medians over the pairs).
Without a CUDA GPU or the tensorrt package it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ultralytics import YOLO

from visionmoe import VisionMoE
from visionmoe.export.formats import tensorrt_available
from visionmoe.utils.latency import paired_latency

FORMS = ("branch", "gather")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--scale", default="n")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", default="0", help="CUDA device index")
    args = parser.parse_args(argv)
    if not tensorrt_available():
        print("benchmarks/tensorrt.py: no CUDA GPU or no tensorrt package here, nothing to measure")
        return 0

    import tensorrt

    dense = f"yolo11{args.scale}"
    export = dict(format="engine", half=True, imgsz=args.imgsz, batch=1, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = YOLO(f"{dense}.yaml")
        model.model.pt_path = str(Path(tmp) / f"{dense}.pt")
        files = {dense: model.export(simplify=False, **export)}
        for experts in args.experts:
            for form in FORMS:
                moe = VisionMoE(f"visionmoe-yolo-{args.scale}.yaml", experts=experts, top_k=1)
                moe.model.pt_path = str(Path(tmp) / f"e{experts}-{form}.pt")
                files[f"e{experts}-{form}"] = moe.export(moe_dispatch=form, **export)
        timed = paired_latency(files, dense, "tensorrt", args.imgsz, device=f"cuda:{args.device}", runs=args.runs,
                               warmup=args.warmup)  # fmt: skip

    print(f"\nTensorRT {tensorrt.__version__} FP16, batch 1, imgsz {args.imgsz}; each engine beside {dense} alone, "
          f"median of {args.runs} interleaved rounds after {args.warmup} warmup, in 3 child processes per pair")
    for name, (t, _) in timed.items():
        print(f"  {name:<12} {t:8.3f} ms")
    for name, (_, ratio) in timed.items():
        if name != dense:
            print(f"  {name} / {dense}: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
