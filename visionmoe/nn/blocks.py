"""MoE blocks: drop-in sparse replacements for dense Ultralytics blocks."""

from __future__ import annotations

from copy import deepcopy
from typing import Literal

import torch
from torch import nn
from ultralytics.nn.modules import C3k2

from .dispatch import dense_mixture, sparse_mixture
from .experts import BottleneckStack, reinitialize
from .router import Router
from .routing import Routing
from .settings import MoESettings

Dispatch = Literal["sparse", "dense"]


class MoEBlock(nn.Module):
    """Base of all MoE blocks: holds the router, the experts and the last routing decision.

    `dispatch` picks how the experts run: 'sparse' (only chosen experts compute, the default) or 'dense'
    (the reference: every expert runs and unchosen ones are weighted 0).
    """

    dense: type[nn.Module]  # the Ultralytics block this one replaces, as built by the stock parser

    def __init__(self) -> None:
        super().__init__()
        self.dispatch: Dispatch = "sparse"
        self.routing: Routing | None = None

    def __getstate__(self) -> dict:
        # The last routing is scratch state for losses and logging; never pickle it into checkpoints.
        return {**super().__getstate__(), "routing": None}

    def params_per_expert(self) -> int:
        """Parameters of one routed expert (all experts of a block have the same shape)."""
        return sum(p.numel() for p in self.experts[0].parameters())

    def mixture(self, x: torch.Tensor, experts: nn.ModuleList, routing: Routing) -> torch.Tensor:
        mix = sparse_mixture if self.dispatch == "sparse" else dense_mixture
        return mix(x, experts, routing.indices, routing.gates)


class MoEC3k2(MoEBlock):
    """C3k2 whose bottleneck chain becomes E experts, k of them chosen per image by a router on the block's features.

    x [B, c1, H, W] -> cv1 -> split (a, b); h = sum_j gate_j * expert_j(b) (+ shared(b)); cv2(cat(a, b, h))
    -> [B, c2, H, W]. The input and output convs stay dense, so at k=1 the block costs what C3k2 costs.
    """

    dense = C3k2

    def __init__(
        self, cv1: nn.Module, cv2: nn.Module, experts: list[nn.Module], router: Router, shared: nn.Module | None
    ):
        super().__init__()
        self.cv1, self.cv2 = cv1, cv2
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.shared = shared

    @classmethod
    def from_dense(cls, block: C3k2, settings: MoESettings, upcycle: bool = False) -> MoEC3k2:
        """Build from a dense C3k2, reusing its convs; experts copy its bottlenecks (upcycle) or start fresh."""

        def expert() -> BottleneckStack:
            blocks = deepcopy(block.m)
            return BottleneckStack(blocks if upcycle else reinitialize(blocks))

        experts = [expert() for _ in range(settings.experts)]
        shared = expert() if settings.shared_expert else None
        return cls(block.cv1, block.cv2, experts, Router(block.c, settings), shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).chunk(2, 1)
        self.routing = self.router(b)
        h = self.mixture(b, self.experts, self.routing)
        if self.shared is not None:
            h = h + self.shared(b)
        return self.cv2(torch.cat((a, b, h), 1))


MOE_BLOCKS: dict[str, type[MoEBlock]] = {"MoEC3k2": MoEC3k2}
