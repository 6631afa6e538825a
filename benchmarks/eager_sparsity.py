"""Eager PyTorch CPU latency of the YOLO-MoE: cost follows top_k, not the number of experts.

Prints, measured side by side in one run (medians of --runs interleaved rounds after warmup):
  E=16 over E=4 at k=1 (sparse: should stay near 1), k=2 over k=1 at E=8, and dense dispatch over sparse at E=8.

    python benchmarks/eager_sparsity.py [--scale n] [--imgsz 640] [--batch 1] [--runs 20]
"""

from __future__ import annotations

import argparse

import torch

from visionmoe.nn.tasks import build_model
from visionmoe.utils import allowed_cpus
from visionmoe.utils.latency import interleaved_median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="n")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(allowed_cpus())
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.imgsz, args.imgsz)

    def model(experts: int, top_k: int, dispatch: str = "sparse") -> torch.nn.Module:
        m = build_model(f"visionmoe-yolo-{args.scale}.yaml", verbose=False, experts=experts, top_k=top_k).eval()
        m.fuse(verbose=False)
        for block in m.moe_blocks():
            block.dispatch = dispatch
        return m

    configs = {"E4 k1": (4, 1), "E16 k1": (16, 1), "E8 k1": (8, 1), "E8 k2": (8, 2), "E8 k1 dense": (8, 1, "dense")}
    models = {name: model(*cfg) for name, cfg in configs.items()}
    with torch.inference_mode():
        ms = interleaved_median_ms({name: (lambda m=m: m(x)) for name, m in models.items()}, args.runs)
    print(f"visionmoe-yolo-{args.scale}, eager PyTorch CPU ({torch.get_num_threads()} threads), imgsz {args.imgsz}, "
          f"batch {args.batch}, median of {args.runs} interleaved rounds")  # fmt: skip
    for name, value in ms.items():
        print(f"{name:>12}: {value:8.1f} ms")
    print(f"E=16 / E=4 at k=1 (sparse):   {ms['E16 k1'] / ms['E4 k1']:.3f}x")
    print(f"k=2 / k=1 at E=8 (sparse):    {ms['E8 k2'] / ms['E8 k1']:.3f}x")
    print(f"dense / sparse at E=8, k=1:   {ms['E8 k1 dense'] / ms['E8 k1']:.3f}x")


if __name__ == "__main__":
    main()
