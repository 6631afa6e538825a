"""How much a letterbox border changes a trained MoE's routing.

Ultralytics validates in rectangular batches padded to a stride multiple plus half a stride (`pad=0.5`): at imgsz 128
a square image gets a 16-pixel grey (114) border on every side, 36% of the input, which training images (no mosaic
after `close_mosaic`) mostly do not have. A router that pools its block's features over the whole map sees the border;
this script routes the val images of a synth-shapes set once as the model sees them in training (resized to imgsz,
no border) and once as validation feeds them (same pixels, with the border), and prints, per MoE layer, the share of
images whose expert changes and the expert shares both ways.

    python benchmarks/router_padding.py --weights runs/detect/train/weights/best.pt [--data DIR] [--imgsz 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from visionmoe import VisionMoE
from visionmoe.nn.tasks import LETTERBOX_FILL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="trained per-image MoE checkpoint")
    parser.add_argument("--data", default="datasets/synth-shapes", help="dataset root holding images/val")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--border", type=int, default=16, help="pixels of grey border per side (pad=0.5 at stride 32)")
    args = parser.parse_args()

    model = VisionMoE(args.weights).model.float().eval()
    files = sorted((Path(args.data) / "images" / "val").glob("*.jpg"))
    size = (args.imgsz, args.imgsz)
    images = [cv2.resize(cv2.imread(str(f)), size, interpolation=cv2.INTER_AREA)[..., ::-1] for f in files]
    x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).float() / 255

    def route(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            model(batch)
        return {name: block.routing.indices[:, 0] for name, block in model.named_moe_blocks()}

    plain = route(x)
    bordered = route(F.pad(x, [args.border] * 4, value=LETTERBOX_FILL / 255))
    print(f"{args.weights}: {len(files)} val images at {args.imgsz} px, plain vs a {args.border}-px grey border")
    print(f"{'layer':10s} {'changed':>8s}  shares plain -> bordered")
    e = model.moe_settings.experts
    for name, experts in plain.items():
        changed = (experts != bordered[name]).float().mean().item()
        shares = [f"{v:.2f}" for v in torch.bincount(experts, minlength=e).float().div(len(files)).tolist()]
        shares_b = [f"{v:.2f}" for v in torch.bincount(bordered[name], minlength=e).float().div(len(files)).tolist()]
        print(f"{name:10s} {changed:8.2f}  [{' '.join(shares)}] -> [{' '.join(shares_b)}]")


if __name__ == "__main__":
    main()
