"""ViT-MoE cost benchmark: active GFLOPs and eager CPU latency against the same ViT with dense MLPs, and across E.

Targets (issue 3), measured as ratios within one run:
  - active GFLOPs of ViT-MoE (top_k=1) within 10% of the dense-MLP ViT;
  - latency, imgsz 640, batch 1: ViT-MoE (k=1, E=8) / dense ViT <= 1.15, and E=16 / E=4 <= 1.1.
Latencies are medians over rounds that run every model once each, so load from other processes hits all alike.

    python benchmarks/vit_moe.py --scale s --imgsz 640 --rounds 7
"""

from __future__ import annotations

import argparse
import sys

import torch

from visionmoe.nn import build_model
from visionmoe.nn.vit import dense_baseline
from visionmoe.utils import allowed_cpus
from visionmoe.utils.flops import active_gflops
from visionmoe.utils.latency import interleaved_median_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="s", help="model scale of visionmoe-vit.yaml")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(allowed_cpus())
    cfg = f"visionmoe-vit-{args.scale}.yaml"

    def build(**moe) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(cfg, verbose=False, top_k=1, **moe).eval()

    models = {"dense": dense_baseline(build()), "E=4": build(experts=4), "E=8": build(experts=8)}
    models["E=16"] = build(experts=16)
    gflops = {name: active_gflops(m, args.imgsz) for name, m in models.items()}
    x = torch.zeros(1, 3, args.imgsz, args.imgsz)
    with torch.inference_mode():
        ms = interleaved_median_ms({name: (lambda m=m: m(x)) for name, m in models.items()}, args.rounds, warmup=2)

    print(f"{cfg} top_k=1, imgsz {args.imgsz}, batch 1, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"{'model':>6} {'GFLOPs':>8} {'latency ms':>11}")
    for name in models:
        print(f"{name:>6} {gflops[name]:8.2f} {ms[name]:11.1f}")
    checks = [
        ("active GFLOPs E=8 / dense", gflops["E=8"] / gflops["dense"], 1.10),
        ("latency E=8 / dense", ms["E=8"] / ms["dense"], 1.15),
        ("latency E=16 / E=4", ms["E=16"] / ms["E=4"], 1.10),
    ]
    for label, ratio, limit in checks:
        print(f"{label:>26}: {ratio:.3f} (target <= {limit}) {'ok' if ratio <= limit else 'MISSED'}")
    return 0 if all(ratio <= limit for _, ratio, limit in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
