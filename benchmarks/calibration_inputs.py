"""What a token-routed checkpoint drops on the two inputs it meets, before and after `VisionMoE.calibrate`.

    python benchmarks/calibration_inputs.py --weights best.pt [best2.pt ...] [--data synth-shapes.yaml] [--imgsz 128]

The two inputs are the val split letterboxed square at imgsz (what a static export sees) and the same images as
Ultralytics' validator loads them (rect batches padded by half a stride). For each checkpoint: its eval capacity
factors and the share of token-routed assignments dropped on each input as saved, then the same after calibrating
it again on the split (which fits both inputs; a checkpoint from an older visionmoe was fitted on the square
images alone).
"""

from __future__ import annotations

import argparse

import torch
from ultralytics.cfg import get_cfg
from ultralytics.data.utils import check_det_dataset
from vit_export import drop_rate

from visionmoe import VisionMoE
from visionmoe.data import find_data_yaml
from visionmoe.models.yolo.calibrate import SplitImages
from visionmoe.nn.capacity import token_routed_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", required=True, help="token-routed checkpoints (best.pt)")
    parser.add_argument("--data", default="synth-shapes.yaml")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    data = find_data_yaml(args.data)
    cfg = get_cfg(overrides={"imgsz": args.imgsz, "batch": args.batch, "workers": 0})
    split = check_det_dataset(data)
    for weights in args.weights:
        model = VisionMoE(weights)
        net = model.model.float().eval()
        stride = max(int(net.stride.max()), 32)
        square = list(SplitImages(cfg, split, "val", stride, torch.device("cpu"), as_validated=False))
        validated = list(SplitImages(cfg, split, "val", stride, torch.device("cpu")))[len(square) :]
        for when in ("as saved", "recalibrated"):
            if when == "recalibrated":
                model.calibrate(data=data, imgsz=args.imgsz, batch=args.batch, workers=0)
                net = model.model.eval()
            layers = token_routed_layers(net)
            factors = " | ".join(" ".join(f"{f:g}" for f in m.eval_capacity_factors) for _, m in layers)
            print(
                f"{weights} {when}: eval factors {factors}; dropped {drop_rate(net, square):.2%} of the square inputs, "
                f"{drop_rate(net, validated):.2%} of the validator's"
            )


if __name__ == "__main__":
    main()
