"""Is the exported MoE as fast as the dense YOLO11 it replaces, and does its cost follow k, not E?

    python benchmarks/export_latency.py [--imgsz 640 320] [--scale n] [--runs 30] [--warmup 5] [--repeats 3]
                                        [--runtime onnxruntime]

Exports dense YOLO11 and visionmoe-yolo (top_k=1) with 4 and 16 experts in each sparse form (branch: an If over
the experts' own constant-weight subgraphs; gather: stacked weights gathered at runtime into one grouped conv), plus
the dense fallback at 8 experts, then times each of them at batch 1 beside YOLO11 alone, in interleaved rounds, in
`--repeats` fresh child processes per pair (ONNX Runtime spinning off; see visionmoe/utils/latency.py). Prints each
model's median and its median ratio to YOLO11 over the pairs, and:
  - MoE / YOLO11 per form and E (the bar for the default form: <= 1.05);
  - E=16 / E=4 per form (sparse: cost follows k, not E; target <= 1.15);
  - gather / dense fallback at E=8 (should be well under 1).
Models have random weights: latency does not depend on them.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ultralytics import YOLO

from visionmoe import VisionMoE
from visionmoe.utils import allowed_cpus
from visionmoe.utils.latency import paired_latency

FORMS = ("branch", "gather")


def export_moe(folder: Path, experts: int, dispatch: str, imgsz: int, scale: str, fmt: str) -> str:
    model = VisionMoE(f"visionmoe-yolo-{scale}.yaml", experts=experts, top_k=1)
    model.model.pt_path = str(folder / f"e{experts}-{dispatch}-{imgsz}.pt")  # the export lands next to it
    return model.export(format=fmt, imgsz=imgsz, batch=1, moe_dispatch=dispatch)


def export_dense(folder: Path, imgsz: int, scale: str, fmt: str) -> str:
    model = YOLO(f"yolo11{scale}.yaml")
    model.model.pt_path = str(folder / f"yolo11{scale}-{imgsz}.pt")
    return model.export(format=fmt, imgsz=imgsz, batch=1, **({"simplify": False} if fmt == "onnx" else {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imgsz", type=int, nargs="+", default=[640, 320])
    parser.add_argument("--scale", default="n", help="model scale of visionmoe-yolo.yaml and yolo11.yaml")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="child processes per (model, YOLO11) pair")
    parser.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"])
    args = parser.parse_args()
    fmt = "onnx" if args.runtime == "onnxruntime" else "openvino"
    dense = f"yolo11{args.scale}"

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for imgsz in args.imgsz:
            files = {dense: export_dense(Path(tmp), imgsz, args.scale, fmt)}
            for form in FORMS:
                for experts in (4, 16):
                    files[f"e{experts}-{form}"] = export_moe(Path(tmp), experts, form, imgsz, args.scale, fmt)
            files["e8-gather"] = export_moe(Path(tmp), 8, "gather", imgsz, args.scale, fmt)
            files["e8-dense"] = export_moe(Path(tmp), 8, "dense", imgsz, args.scale, fmt)
            results[imgsz] = paired_latency(files, dense, args.runtime, imgsz, args.repeats, runs=args.runs,
                                            warmup=args.warmup)  # fmt: skip

    print(f"\n{args.runtime} CPU ({allowed_cpus()} threads), batch 1, top_k=1; each model beside {dense} alone, "
          f"median of {args.runs} interleaved rounds after {args.warmup} warmup, in {args.repeats} child processes "
          f"per pair; ms and ratios are medians over the pairs")  # fmt: skip
    for imgsz, timed in results.items():
        ratio = {name: r for name, (_, r) in timed.items()}
        print(f"imgsz {imgsz}")
        for name, (t, r) in timed.items():
            print(f"  {name:<12} {t:8.1f} ms  {r:.3f}x {dense}")
        for form in FORMS:
            for experts in (4, 16):
                print(f"  e{experts}-{form} / {dense}: {ratio[f'e{experts}-{form}']:.3f}  (target <= 1.05)")
        for form in FORMS:
            print(f"  e16 / e4 ({form}):      {ratio[f'e16-{form}'] / ratio[f'e4-{form}']:.3f}  (target <= 1.15)")
        print(f"  gather / dense (E=8):  {ratio['e8-gather'] / ratio['e8-dense']:.3f}  (should be well under 1)")


if __name__ == "__main__":
    main()
