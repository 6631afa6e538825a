"""Prototype: one routing decision per image, made by the first MoE block and followed by all the others.

    python benchmarks/shared_routing.py data=synth-shapes.yaml epochs=20 imgsz=128 batch=16 nbs=16 workers=1 seed=0 \
        project=/tmp/exp/train name=shared_s0 [any other `visionmoe train` setting]

Trains visionmoe-yolo-n (default recipe) where, once routing starts, only the first MoEC3k2 block (model.6, the
first at stride 16) runs its router; every later block sends the image to the expert of the same index. An image thus
takes one path of experts through the whole network, as under oracle domain routing (`oracle_routing.py`). In the
default MoE each block's router splits the images its own way, so an expert of one block meets the images of all
experts of the next. The one router gets the task gradient of every block's gate and the balance losses of all six,
so the aux loss weighs what six routers' did. Same parameters and compute as the default MoE; the later routers stay
idle.
"""

from __future__ import annotations

import torch
from block_prototype import train_with_block

from visionmoe.nn.blocks import MoEC3k2

LEADER: dict[str, object] = {"routing": None}  # the routing of the current forward pass, written by the first block


class SharedRoutingMoEC3k2(MoEC3k2):
    leads = False  # set on the model's first MoE block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), 1)
        if self.tied:
            self.routing, h = None, self.experts[0](b)
        else:
            if self.leads:
                LEADER["routing"] = self.router(b)
            self.routing = LEADER["routing"]
            h = self.mixture(b, self.experts, self.routing)
        return self.cv2(torch.cat((a, b, h), 1))


def lead_with_first(blocks: list[MoEC3k2]) -> None:
    blocks[0].leads = True


if __name__ == "__main__":
    train_with_block(SharedRoutingMoEC3k2, lead_with_first)
