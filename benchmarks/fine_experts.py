"""Prototype recipe: finer experts, one from each of k groups per image, at the default MoE's active FLOPs.

    python benchmarks/fine_experts.py data=synth-shapes.yaml epochs=20 imgsz=128 batch=16 nbs=16 workers=1 seed=0 \
        experts=4 top_k=2 project=/tmp/exp/train name=fine_e4k2 [any other `visionmoe train` setting]

Trains visionmoe-yolo-n (default recipe, domain_loss=0 unless given) where every MoEC3k2 block's E experts are
narrowed so that k of them cost what one of the default's does (hidden widths chosen so that k experts' FLOPs are at
most one dense chain's), and split into k groups of E/k; each
image runs the top expert of every group (group-limited routing, as DeepSeek-V3's node-limited routing at its
extreme) with gate 1/k, so a block averages k fine experts. Fine-grained expert segmentation (DeepSeekMoE, Dai et al.
2024) buys more combinations at the same compute: at E=4, k=2 each expert sees half the images instead of a quarter
(four combinations); at E=8, k=2 a quarter, with sixteen combinations.

The groups make the dense warmup exact: tied blocks run the first expert of each group for every image, and the split
copies it into the rest of its group, so every choice then computes what the tied block did. A plain top-k over all
E copies could pick two copies of one expert and change the function at the split.
"""

from __future__ import annotations

import torch
from block_prototype import train_with_block
from torch import nn
from ultralytics.nn.modules import Bottleneck
from ultralytics.nn.modules.block import C3k

from visionmoe.nn.blocks import MoEC3k2
from visionmoe.nn.experts import BottleneckStack
from visionmoe.nn.router import Router
from visionmoe.nn.routing import LOGIT_CLAMP, Routing
from visionmoe.utils.flops import active_gflops


def narrowed(block: nn.Module, fraction: float) -> nn.Module:
    """A freshly initialised copy of a Bottleneck or C3k with the widest hidden width whose FLOPs are at most
    `fraction` of `block`'s (counted on an 8x8 map: the blocks' convs keep the map size, so the ratio holds at any)."""
    c1, hidden = block.cv1.conv.in_channels, block.cv1.conv.out_channels
    if isinstance(block, Bottleneck):
        c2 = block.cv2.conv.out_channels
        build = lambda h: Bottleneck(c1, c2, block.add, k=(3, 3), e=(h + 0.5) / c2)  # noqa: E731
    elif isinstance(block, C3k):
        c2 = block.cv3.conv.out_channels
        build = lambda h: C3k(c1, c2, len(block.m), block.m[0].add, e=(h + 0.5) / c2)  # noqa: E731
    else:
        raise TypeError(f"no narrow form for {type(block).__name__}")
    budget = fraction * active_gflops(block, 8, ch=c1)
    h = max(h for h in range(1, hidden + 1) if active_gflops(build(h), 8, ch=c1) <= budget)
    return build(h)


class GroupRouter(Router):
    """Router over k groups of E/k experts: the top expert of each group, each with gate 1/k (value), whose gradient
    is that of log p within its group (as renormalized top-1). No gate noise: the default recipe sets none."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Routing:
        logits = self.logits(x, context).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        k, e = self.top_k, self.num_experts
        grouped = logits.view(-1, k, e // k)
        probs = grouped.softmax(-1)
        best = grouped.argmax(-1)  # [B, k]
        p = probs.gather(-1, best.unsqueeze(-1)).squeeze(-1)
        gates = p / p.detach() / k
        indices = best + torch.arange(k, device=best.device) * (e // k)
        return Routing(logits, probs.flatten(1) / k, gates, indices)  # probs over all E sum to 1, for the losses


class FineMoEC3k2(MoEC3k2):
    """MoEC3k2 with fine experts in k groups: tied, the first expert of every group runs, each with weight 1/k."""

    def group_heads(self) -> list[nn.Module]:
        per = len(self.experts) // self.router.top_k
        return [self.experts[g * per] for g in range(self.router.top_k)]

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if not self.tied:
            return super().forward(x)
        x = x[0] if isinstance(x, list) else x  # the router's context map: idle while tied
        a, b = self.cv1(x).split((self.c, self.c), 1)
        self.routing = None
        heads = self.group_heads()
        h = sum(expert(b) for expert in heads) / len(heads)
        return self.cv2(torch.cat((a, b, h), 1))

    def split(self, residual: bool = False) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Copy each group's first expert into the rest of its group (weights and norm statistics)."""
        if residual:
            raise ValueError("fine experts split by copying; residual_experts is not supported here")
        return super().split()

    def split_source(self, index: int) -> int:
        """The first expert of `index`'s group."""
        return index - index % (len(self.experts) // self.router.top_k)


def make_fine(blocks: list[MoEC3k2]) -> None:
    """Narrow every block's experts to 1/k of a dense chain's FLOPs and give it the group router."""
    for block in blocks:
        k, e = block.router.top_k, len(block.experts)
        if k < 2 or e % k:
            raise ValueError(f"fine experts need top_k >= 2 dividing experts (got experts={e}, top_k={k})")
        dense = block.experts[0]
        block.experts = nn.ModuleList(BottleneckStack(narrowed(m, 1 / k) for m in dense.m) for _ in range(e))
        block.router.__class__ = GroupRouter


if __name__ == "__main__":
    import fine_experts  # so that checkpoints name these classes by module: PYTHONPATH=benchmarks loads them

    train_with_block(fine_experts.FineMoEC3k2, fine_experts.make_fine)
