"""Accuracy ceiling of per-pixel routing in the YOLO-MoE: every position of a block's map picks its own expert.

    python benchmarks/pixel_routing.py data=synth-shapes.yaml epochs=20 imgsz=128 batch=16 nbs=16 workers=1 seed=0 \
        project=/tmp/exp/train name=pixel_s0 [any other `visionmoe train` setting]

Trains visionmoe-yolo-n (default recipe: dense warmup, then routing) where every MoEC3k2 block, once routing starts,
routes each position of its feature map instead of each image: the block's router reads the position's channels
(its input as a token) and picks the top-k experts there, and the block's output at that position is the
gate-weighted sum of those experts' outputs. An image thus uses every expert its positions chose, and every expert
trains on parts of every image, where per-image routing gives it a quarter of the images (benchmarks/results/
recipe.md: per-image routing, even by the oracle domain, stays level with YOLO11n).

Not sparse: the experts are 3x3 conv chains, so an expert's output at one position needs its inputs around it, and
this prototype runs every expert on the whole map and selects per position (E times the experts' compute in training
and validation). It measures what per-position choice could buy before building a sparse form for it (one that runs
an expert only on the windows its positions need); no export form.
"""

from __future__ import annotations

import torch
from block_prototype import train_with_block

from visionmoe.nn.blocks import MoEC3k2


class PixelMoEC3k2(MoEC3k2):
    """MoEC3k2 routing each position of its map: routing.indices [B, H*W, k], as a token-routed layer's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), 1)
        if self.tied:
            self.routing, h = None, self.experts[0](b)
        else:
            n, _, height, width = b.shape
            self.routing = routing = self.router(b.flatten(2).transpose(1, 2))  # positions as tokens
            weights = b.new_zeros(n, height * width, len(self.experts))
            weights = weights.scatter(2, routing.indices, routing.gates.to(b.dtype))  # [B, H*W, E], 0 if not chosen
            weights = weights.transpose(1, 2).reshape(n, -1, 1, height, width)
            h = sum(weights[:, e] * expert(b) for e, expert in enumerate(self.experts))
        if self.shared is not None:
            h = h + self.shared(b)
        return self.cv2(torch.cat((a, b, h), 1))


if __name__ == "__main__":
    train_with_block(PixelMoEC3k2)
