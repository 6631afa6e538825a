"""Eager PyTorch latency on a CUDA GPU: visionmoe-yolo (k=1, E=4 and 16) beside dense YOLO11 of the same scale.

    python benchmarks/gpu_latency.py [--scale n] [--imgsz 320 640] [--batch 1 16] [--runs 200] [--device cuda:0]

What `model.predict(..., device=0)` costs per forward: fused fp32 copies of fresh models (routing cost does not depend
on the weights at k=1), the MoE in its default sparse dispatch and in the export's gathered form (`moe_dispatch=gather`:
constant k, no host synchronisation), timed interleaved in one process (medians of --runs rounds after a warmup).
Prints each model's median and its ratio to YOLO11 per image size and batch. Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse

import torch
from ultralytics import YOLO

from visionmoe import VisionMoE
from visionmoe.export.exporter import prepare
from visionmoe.utils.latency import torch_latency_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="n")
    parser.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_latency.py: no CUDA GPU here, nothing to measure")
        return 0
    torch.manual_seed(0)
    dense = f"yolo11{args.scale}"
    models = {dense: YOLO(f"{dense}.yaml").model}
    for experts in args.experts:
        moe = VisionMoE(f"visionmoe-yolo-{args.scale}.yaml", experts=experts, top_k=1).model
        models[f"moe-e{experts}"] = moe
        models[f"moe-e{experts}-gather"] = prepare(moe, "gather")
    print(f"{torch.cuda.get_device_name(args.device)}, torch {torch.__version__}, fp32, fused")
    for imgsz in args.imgsz:
        for batch in args.batch:
            ms = torch_latency_ms(models, imgsz, args.device, runs=args.runs, warmup=20, batch=batch)
            cells = "  ".join(f"{name} {t:.2f} ms ({t / ms[dense]:.2f}x)" for name, t in ms.items())
            print(f"imgsz {imgsz} batch {batch}: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
