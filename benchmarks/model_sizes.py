"""Total params, active params and active GFLOPs of every YOLO-MoE scale beside dense YOLO11, counted the same way.

    python benchmarks/model_sizes.py [--imgsz 640] [--experts 4] [--top-k 1]
"""

from __future__ import annotations

import argparse

from ultralytics.nn.tasks import DetectionModel

from visionmoe.nn.tasks import build_model
from visionmoe.utils.flops import active_gflops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=1)
    args = parser.parse_args()
    print(f"| scale | YOLO11 params | MoE params (E={args.experts}) | MoE active params | YOLO11 GFLOPs "
          f"| MoE active GFLOPs (k={args.top_k}) | active GFLOPs ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for scale in "nsmlx":
        dense = DetectionModel(f"yolo11{scale}.yaml", verbose=False)
        moe = build_model(f"visionmoe-yolo-{scale}.yaml", verbose=False, experts=args.experts, top_k=args.top_k)
        dense_flops, moe_flops = active_gflops(dense, args.imgsz), active_gflops(moe, args.imgsz)
        print(
            f"| {scale} | {sum(p.numel() for p in dense.parameters()):,} | {sum(p.numel() for p in moe.parameters()):,} "
            f"| {moe.active_params():,} | {dense_flops:.2f} | {moe_flops:.2f} | {moe_flops / dense_flops:.3f} |"
        )


if __name__ == "__main__":
    main()
