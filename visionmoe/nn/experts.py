"""Experts: the sub-networks a router chooses between."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call


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


class ResidualExpert(nn.Module):
    """Expert `delta` of a residual split: runs as `base` with weights base + delta and `delta`'s own buffers (its
    norm statistics), so that gradients reach both the base, shared by every expert, and the delta.

    x [B, ...] -> base(x)'s shape. A view built per forward (`MoEBlock.routed_experts`); it holds no parameters of its
    own, and `fold` turns the pair into one independent expert.
    """

    def __init__(self, base: nn.Module, delta: nn.Module):
        super().__init__()
        self.base, self.delta = base, delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deltas = self.delta.parameters()
        weights = {name: p + d for (name, p), d in zip(self.base.named_parameters(), deltas, strict=True)}
        return functional_call(self.base, {**weights, **dict(self.delta.named_buffers())}, (x,))

    @torch.no_grad()
    def fold(self) -> None:
        """Make `delta` the independent expert it stands for: delta <- base + delta, in place."""
        for d, p in zip(self.delta.parameters(), self.base.parameters(), strict=True):
            d.add_(p)


def reinitialize(module: nn.Module) -> nn.Module:
    """Give every layer of `module` fresh random parameters (and fresh norm statistics), in place."""
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


class MlpExperts(nn.Module):
    """E two-layer MLP experts (fc1-act-fc2) with stacked weights, run on all experts' token buffers at once.

    x [B, E, N, D] -> [B, E, N, D], expert e on x[:, e] (x [B, 1, N, D] runs every expert on the same tokens), as two
    batched matmuls over [E, D, H] and [E, H, D] weights; with `expert=e`, x [B, N, D] -> [B, N, D] through expert e
    alone. Initialised like E independent nn.Linear pairs.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.act = act()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = w.shape[1] ** -0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def params_per_expert(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        if expert is not None:
            h = self.act(x @ self.w1[expert] + self.b1[expert])
            return h @ self.w2[expert] + self.b2[expert]
        h = self.act(x @ self.w1 + self.b1.unsqueeze(1))
        return h @ self.w2 + self.b2.unsqueeze(1)
