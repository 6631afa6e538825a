"""Routing math: pure functions on router logits, kept apart from the layers that use them.

Shapes: N routed items (images for per-image routing, tokens for token routing), E experts, k chosen per item.
Leading dimensions may be any shape ([B, E] or [B, T, E]); the losses pool over all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOGIT_CLAMP = 30.0  # keeps exp() of fp32 logits far from overflow; the z-loss keeps real logits much smaller


@dataclass
class Routing:
    """One router decision.

    Attributes:
        logits: [..., E] clamped fp32 logits before noise (the z-loss reads these).
        probs: [..., E] softmax of the (noisy, in training) logits.
        gates: [..., k] weights of the chosen experts, highest first.
        indices: [..., k] chosen experts, int64.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    gates: torch.Tensor
    indices: torch.Tensor


def route(
    logits: torch.Tensor,
    top_k: int,
    renormalize: bool = False,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> Routing:
    """Softmax in fp32, then top-k with a constant k.

    Args:
        logits: [..., E] router outputs.
        top_k: Experts to choose per item.
        renormalize: Divide the chosen gates by their sum, so they add up to 1.
        noise: Std of Gaussian noise added to the logits before the softmax (pass 0 outside training).
        generator: RNG for the noise, so that it can be seeded and checkpointed.
    """
    logits = logits.float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    noisy = logits
    if noise > 0:
        noisy = logits + noise * torch.randn(logits.shape, generator=generator, device=logits.device)
    probs = noisy.softmax(-1)
    gates, indices = probs.topk(top_k, dim=-1)
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return Routing(logits, probs, gates, indices)


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] number of (item, slot) assignments per expert."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts)


def expert_shares(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] fraction of all top-k assignments that went to each expert (sums to 1)."""
    counts = expert_counts(indices, num_experts).float()
    return counts / counts.sum().clamp(min=1)


def switch_balance_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Switch load-balance loss without its weight: `E * sum_i f_i * P_i`.

    f_i is the share of hard top-k assignments that went to expert i (no gradient), P_i the mean router
    probability of expert i over all items (gradient flows). Perfect balance gives 1.
    """
    num_experts = probs.shape[-1]
    f = expert_shares(indices, num_experts)
    p = probs.reshape(-1, num_experts).mean(0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss without its weight: `mean(logsumexp(logits)^2)` over all items."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def aux_loss(routing: Routing, balance_weight: float, z_weight: float) -> torch.Tensor:
    """Weighted sum of the two auxiliary losses of one layer: `alpha * balance + beta * z`."""
    return balance_weight * switch_balance_loss(routing.probs, routing.indices) + z_weight * router_z_loss(
        routing.logits
    )


def expert_capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert for one image's tokens: `C = ceil(k * T * cf / E)`, at most T."""
    return min(tokens, math.ceil(top_k * tokens * capacity_factor / num_experts))
