"""Prototype: residual experts, which keep learning from every image after the split.

    python benchmarks/residual_experts.py scale=1.0 data=synth-shapes.yaml domain_loss=auto epochs=20 imgsz=128 \
        batch=16 nbs=16 workers=1 seed=0 project=/tmp/exp/screen name=residual_s0

Trains visionmoe-yolo-n (default recipe; `domain_loss=auto` must be given, since the prototype entry point turns it
off by default) with every MoEC3k2 block splitting differently at the end of the dense warmup. The default split
copies the tied expert into E independent experts, so each trains on its share of the images only. Here expert 0
stays the tied expert and becomes the base of the others: expert e > 0 computes with weights base + scale * delta_e,
where delta_e starts at zero (so the split changes no output, as the default's does) and trains on expert e's images
alone, while the base keeps training on every image, through whichever expert the image chose. Each expert keeps its
own BatchNorm statistics. Active compute per image is unchanged (one expert's convs, with summed weights), and so is
the parameter count. Checkpoints hold the experts folded (expert e = base + scale * delta_e, a plain MoEC3k2), so the
final validation, `visionmoe analyze` and export read them as any MoE model.

Why (benchmarks/results/recipe.md, stops 15 and 29): with the default the MoE is level with YOLO11n at the end of
the dense warmup and loses ~0.008 mAP50-95 over the routed epochs, and the tied-only control (never split) ends above
the routed model: the split costs each expert the data of the others.
"""

from __future__ import annotations

import sys
from copy import deepcopy

import torch
from block_prototype import train_with_block
from torch import nn
from torch.func import functional_call

from visionmoe.nn.blocks import MoEC3k2
from visionmoe.nn.routing import Routing

SCALE = 1.0  # set from the command line (scale=...)


class ResidualExpert:
    """Expert `delta` run as the module `base` with weights base + scale * delta and `delta`'s own buffers."""

    def __init__(self, base: nn.Module, delta: nn.Module, scale: float):
        self.base, self.delta, self.scale = base, delta, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights = {
            name: p + self.scale * d
            for (name, p), d in zip(self.base.named_parameters(), self.delta.parameters())
        }
        weights.update(self.delta.named_buffers())
        return functional_call(self.base, weights, (x,))


class ResidualC3k2(MoEC3k2):
    """MoEC3k2 whose experts after the split are expert 0 (the base) and base + scale * delta_e."""

    residual = False

    def split(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        super().split()  # the router side of the split, and every expert's norm statistics from expert 0
        with torch.no_grad():
            for expert in self.experts[1:]:
                for p in expert.parameters():
                    p.zero_()
        self.residual, self.scale = True, SCALE
        return []  # the deltas start with fresh optimizer state, not expert 0's moments

    def folded_experts(self) -> nn.ModuleList:
        """The experts as independent modules: expert e > 0 gets weights base + scale * delta_e."""
        folded = deepcopy(self.experts)
        with torch.no_grad():
            for expert in folded[1:]:
                for p, base in zip(expert.parameters(), self.experts[0].parameters()):
                    p.mul_(self.scale).add_(base)
        return folded

    def __getstate__(self) -> dict:
        # Checkpoints hold folded experts: a plain MoEC3k2 state that fuses (Conv+BN) and exports as the default does.
        state = super().__getstate__()
        if self.residual:
            state["_modules"] = {**state["_modules"], "experts": self.folded_experts()}
            state["residual"] = False
        return state

    def mixture(self, x: torch.Tensor, experts: nn.ModuleList, routing: Routing) -> torch.Tensor:
        if self.residual:
            base = experts[0]
            experts = [base, *(ResidualExpert(base, delta, self.scale) for delta in experts[1:])]
        return super().mixture(x, experts, routing)


if __name__ == "__main__":
    for arg in [a for a in sys.argv[1:] if a.startswith("scale=")]:
        SCALE = float(arg.split("=", 1)[1])
        sys.argv.remove(arg)
    train_with_block(ResidualC3k2)
