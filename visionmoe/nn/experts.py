"""Experts: the sub-networks a router chooses between."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class BottleneckStack(nn.Module):
    """Expert of a C3k2 MoE block: its chain of n bottlenecks, returning the output of every stage.

    x [B, c, H, W] -> [B, n*c, H, W], the stage outputs concatenated as C3k2's output conv expects them.
    """

    def __init__(self, blocks: Iterable[nn.Module]):
        super().__init__()
        self.m = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stages = []
        for block in self.m:
            x = block(x)
            stages.append(x)
        return torch.cat(stages, 1)


def reinitialize(module: nn.Module) -> nn.Module:
    """Give every layer of `module` fresh random parameters (and fresh norm statistics), in place."""
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module
