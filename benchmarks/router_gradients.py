"""Prototype: where the routers' losses may send gradients, between the default and `detach_router=True`.

    python benchmarks/router_gradients.py variant=context data=synth-shapes.yaml domain_loss=auto epochs=20 \
        imgsz=128 batch=16 nbs=16 workers=1 seed=2 project=/tmp/exp/screen name=context_synth_s2

Trains visionmoe-yolo-n (default recipe; `domain_loss=auto` must be given, since the prototype entry point turns it
off by default) with every MoEC3k2 block's router changed as `variant` says:

- `features`: the routers never train their own block's features, but do train the `router_context` map they all
  read (YOLO11's stride-4 layer), so that one early map can learn to show the domains;
- `context`: the other way round: the routers train their own block's features but not the shared context map.

Why (benchmarks/results/recipe.md, stop 28): with the routers' gradients the MoE is ~0.025 mAP50-95 behind YOLO11n at
the end of the dense warmup on synth-shapes; without them (`detach_router=True`) it is level there, but its routers
route worse and lose more than half of the win on the conflict set. The third screened form, no gradients into the
features while the blocks are tied and all of them after the split, became the setting `detach_router=warmup`.
"""

from __future__ import annotations

import torch
from block_prototype import pop_arg, train_with_block

from visionmoe.nn.blocks import MoEC3k2
from visionmoe.nn.router import Router


class ContextOnlyRouter(Router):
    """A router whose gradients reach the shared context map but not its own block's features."""

    def pool(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return super().pool(x.detach(), context)


class FeaturesOnlyRouter(Router):
    """A router whose gradients reach its own block's features but not the shared context map."""

    def pool(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        pooled = super().pool(x, context)
        if context is None:
            return pooled
        own = pooled.shape[1] - 2 * context.shape[1]  # the context's means and standard deviations come last
        return torch.cat((pooled[:, :own], pooled[:, own:].detach()), 1)


def routers_as(router_class: type[Router]):
    def prepare(blocks: list[MoEC3k2]) -> None:
        for block in blocks:
            block.router.__class__ = router_class

    return prepare


VARIANTS = {
    "features": (MoEC3k2, routers_as(ContextOnlyRouter)),
    "context": (MoEC3k2, routers_as(FeaturesOnlyRouter)),
}

if __name__ == "__main__":
    variant = pop_arg("variant")
    if variant not in VARIANTS:
        raise SystemExit(f"give variant=<{'|'.join(VARIANTS)}> (got {variant!r})")
    train_with_block(*VARIANTS[variant])
