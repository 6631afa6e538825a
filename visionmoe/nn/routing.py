"""Routing math: pure functions on router logits, kept apart from the layers that use them.

Shapes: N routed items (images for per-image routing, tokens for token routing), E experts, k chosen per item.
Leading dimensions may be any shape ([B, E] or [B, T, E]); the losses pool over all of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LOGIT_CLAMP = 30.0  # keeps exp() of fp32 logits far from overflow; the z-loss keeps real logits much smaller
TARGET_DROP = 0.005  # default share of a layer's top-k assignments that a calibrated eval capacity may drop
CAPACITY_STEP = 0.05  # calibrated capacity factors are multiples of this: readable, at most a step of headroom
TOPK_MAX = 3840  # TensorRT's limit on TopK's K; exports check every TopK against it


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
        renormalize: Divide the chosen gates by their sum, so they add up to 1 (at k=1: a gate of value 1 whose
            gradient is that of log p).
        noise: Std of Gaussian noise added to the logits before the softmax (pass 0 outside training).
        generator: RNG for the noise, so that it can be seeded and checkpointed.
    """
    logits = logits.float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    noisy = logits
    if noise > 0:
        noisy = logits + noise * torch.randn(logits.shape, generator=generator, device=logits.device)
    probs = noisy.softmax(-1)
    # The choice reads the logits, not the softmax: the same order, and an exported graph whose gates go unused
    # (renormalized top-1, see `Router.unit_gates`) keeps no Softmax.
    # Equal logits (e.g. two at the clamp) go to the lower expert index, as ONNX TopK specifies; torch.topk leaves
    # ties unordered, so eager inference takes a stable sort and would otherwise pick other experts than the export.
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        indices = noisy.topk(top_k, dim=-1).indices
    else:
        indices = noisy.sort(dim=-1, descending=True, stable=True).indices[..., :top_k]
    gates = probs.gather(-1, indices)
    if renormalize:
        # At k=1, p / p is 1 with a zero gradient: the task loss would never reach the router. Dividing by the
        # detached gate keeps the value 1 (what upcycling needs) and passes the gradient of log p to the router.
        gates = gates / (gates.sum(-1, keepdim=True) if top_k > 1 else gates.detach())
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


def mutual_information_loss(probs: torch.Tensor) -> torch.Tensor:
    """`log E - I(item; expert)` without its weight: `log E - H(mean_n p_n) + mean_n H(p_n)`, in [0, log E].

    Minimising it makes each item's router confident (low H(p_n)) while the experts stay evenly used (high entropy of
    the mean probability): items cluster onto experts. Near-uniform routers (H(p_n) ~ log E) pick experts by tiny logit
    differences, so an expert's images are close to a random subset. As Mod-Squad's expert-task MI loss (Chen et
    al. 2023), with items in place of tasks.
    """
    p = probs.reshape(-1, probs.shape[-1]).float()
    item_entropy = -(p * p.clamp(min=1e-9).log()).sum(-1).mean()
    mean = p.mean(0)
    marginal_entropy = -(mean * mean.clamp(min=1e-9).log()).sum()
    return math.log(p.shape[-1]) - marginal_entropy + item_entropy


def aux_loss(routing: Routing, balance_weight: float, z_weight: float, mi_weight: float = 0.0) -> torch.Tensor:
    """Weighted sum of the auxiliary losses of one layer: `alpha * balance + beta * z + gamma * mi`."""
    loss = balance_weight * switch_balance_loss(routing.probs, routing.indices) + z_weight * router_z_loss(
        routing.logits
    )
    return loss + mi_weight * mutual_information_loss(routing.probs) if mi_weight else loss


def assign(routing: Routing, experts: torch.Tensor) -> Routing:
    """`routing` [N, E] at k=1 with item n sent to `experts[n]` (gate 1) wherever that is >= 0; -1 keeps the router's
    choice. Logits and probs stay the router's, so its losses still see what it predicted."""
    chosen = experts.to(routing.indices.device).unsqueeze(-1)
    keep = chosen < 0
    indices = torch.where(keep, routing.indices, chosen)
    gates = torch.where(keep, routing.gates, torch.ones_like(routing.gates))
    return Routing(routing.logits, routing.probs, gates, indices)


def domain_loss(logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Class-balanced cross-entropy of per-image router logits [N, E] with the expert of each image's domain [N]
    (-1: untagged, ignored): the mean over the experts present of their images' mean cross-entropy; 0 when no image is
    tagged.

    Balanced, because a plain cross-entropy learns each expert's share of the images as a prior: an expert whose
    domains are rare and hard to tell from a common one's (blur from clean) then wins no image at all.
    """
    experts = experts.to(logits.device)
    tagged = experts >= 0
    if not tagged.any():
        return logits.new_zeros(())
    counts = torch.bincount(experts[tagged], minlength=logits.shape[-1]).float()
    weight = torch.where(counts > 0, 1 / counts.clamp(min=1), 0.0) / (counts > 0).sum()  # sums to 1 over the images
    ce = torch.nn.functional.cross_entropy(logits.float(), experts.clamp(min=0), reduction="none")
    return (ce * weight[experts.clamp(min=0)] * tagged).sum()


def expert_capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert for one image's tokens: `C = ceil(k * T * cf / E)`, at most T."""
    return min(tokens, math.ceil(top_k * tokens * capacity_factor / num_experts))


def expert_capacities(tokens: int, top_k: int, factors: Sequence[float]) -> list[int]:
    """Slots of each expert for one image's tokens, one capacity factor per expert: `C_e = ceil(k * T * cf_e / E)`,
    at most T, with E = len(factors). Equal factors give every expert `expert_capacity`."""
    return [expert_capacity(tokens, len(factors), top_k, f) for f in factors]


def priority_order(gates: torch.Tensor) -> torch.Tensor:
    """[B, T] int64 tokens of each image by descending gate, equal gates in raster order (a stable sort).

    The legacy ONNX exporter cannot emit a stable sort, so an export sorts with TopK over all T tokens, whose ONNX
    definition breaks ties the same way (lower index first): O(T log T) where a pairwise ranking built a [T, T]
    comparison (2.6M elements per image at 640 px) and cost 9-10 ms per layer in ONNX Runtime. Above TensorRT's
    TopK limit (`TOPK_MAX` tokens, imgsz > 960 at stride 16) the export ranks pairwise, as TensorRT can run that.
    """
    t = gates.shape[1]
    if not torch.onnx.is_in_onnx_export():
        return gates.sort(dim=1, descending=True, stable=True).indices
    if t <= TOPK_MAX:
        return gates.topk(t, dim=1).indices
    position = torch.arange(t, device=gates.device)
    ahead = (gates.unsqueeze(1) > gates.unsqueeze(2)) | (  # [B, T, T]: token s (last dim) queues before token t
        (gates.unsqueeze(1) == gates.unsqueeze(2)) & (position < position.unsqueeze(1))
    )
    rank = ahead.sum(-1)  # [B, T] each token's place in the queue
    return torch.empty_like(rank).scatter(1, rank, position.expand_as(rank))


def token_slots(
    indices: torch.Tensor, gates: torch.Tensor, num_experts: int, capacity: int | Sequence[int], bpr: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place each image's (token, choice) assignments into their experts' fixed-capacity buffers.

    Within an image, all first choices queue before any second choice (so a token's top expert outranks another
    token's runner-up); within one choice rank tokens queue in raster order, or by descending top gate with `bpr`
    (Batch Prioritized Routing, ties in raster order). An assignment whose position in its expert's queue is
    >= that expert's capacity is dropped. Branch-free with static shapes: BPR orders the tokens with one sort
    (`priority_order`), then one compare and one cumsum give the slots. Expands go through `expand_as`, whose target
    shape folds to a constant in the exported graph.

    Args:
        indices: [B, T, k] chosen experts per token.
        gates: [B, T, k] their gates, highest first (only read with `bpr`).
        num_experts: E.
        capacity: Slots per expert and image: C for every expert (see `expert_capacity`), or [E] values C_e
            (see `expert_capacities`).
        bpr: Order tokens by their top gate instead of by position.

    Returns:
        slots: [B, T, k] int64 position of each assignment in its expert's buffer (valid where kept).
        kept: [B, T, k] bool, slots < the chosen expert's capacity.
    """
    b, t, k = indices.shape
    queue = indices
    if bpr:
        order = priority_order(gates[..., 0]).unsqueeze(-1).expand_as(indices)  # token at each place in the queue
        queue = indices.gather(1, order)
    queue = queue.transpose(1, 2).reshape(b, k * t)  # choice-major: every first choice, then every second...
    onehot = (queue.unsqueeze(-1) == torch.arange(num_experts, device=indices.device)).long()  # [B, k*T, E]
    slots = (onehot.cumsum(1) * onehot).sum(-1) - 1  # rank of each assignment among its expert's assignments
    slots = slots.view(b, k, t).transpose(1, 2)  # [B, T, k] in queue order
    if bpr:  # back to raster order; `order` is a permutation, so the scatter writes each place once
        slots = torch.empty_like(slots).scatter(1, order, slots)
    if not isinstance(capacity, int):  # per expert: each assignment's limit is its expert's capacity
        capacity = torch.tensor(capacity, device=indices.device)[indices]
    return slots, slots < capacity


def token_loads(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[B, E] int64 top-k assignments each expert gets per image, from token routing indices [B, T, k], before any
    capacity limit. Each row sums to k*T."""
    flat = indices.reshape(indices.shape[0], -1)
    loads = torch.zeros(flat.shape[0], num_experts, dtype=torch.long, device=indices.device)
    return loads.scatter_add_(1, flat, torch.ones_like(flat))


def _image_sizes(loads: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct token counts T of the images of `loads` ([N, E], each row sums to k*T), and [N] the index of
    each image's T among them."""
    return (loads.sum(-1) // top_k).unique(return_inverse=True)


def _capacity_table(loads: torch.Tensor, top_k: int, factors: Sequence[float]) -> torch.Tensor:
    """[N, F] slots each of `factors` gives each image of `loads` ([N, E] per-image loads, see `token_loads`); each
    image's T is its row sum / k, so images of different sizes can be mixed."""
    num_experts = loads.shape[-1]
    sizes, size_of_image = _image_sizes(loads, top_k)
    table = [[expert_capacity(t, num_experts, top_k, f) for f in factors] for t in sizes.tolist()]
    return torch.tensor(table, device=loads.device).view(len(sizes), len(factors))[size_of_image]


def capacity_drop_rate(loads: torch.Tensor, top_k: int, capacity_factor: float | Sequence[float]) -> float:
    """Share of all top-k assignments that capacity factors drop, from per-image loads [N, E] (`token_loads`).

    `capacity_factor` is one factor for every expert or [E] factors, one per expert. An expert keeps
    min(load, C_e) of an image's assignments whatever order they queue in, so the count is exact.
    """
    factors = [capacity_factor] * loads.shape[-1] if isinstance(capacity_factor, (int, float)) else capacity_factor
    if len(factors) != loads.shape[-1]:
        raise ValueError(f"{len(factors)} capacity factors for {loads.shape[-1]} experts, give one per expert")
    capacity = _capacity_table(loads, top_k, list(factors))  # [N, E]
    return (loads - capacity).clamp(min=0).sum().item() / max(loads.sum().item(), 1)


def fit_capacity_factors(
    loads: torch.Tensor, top_k: int, max_factor: float, target_drop: float = TARGET_DROP, step: float = CAPACITY_STEP
) -> list[float]:
    """Per-expert capacity factors, multiples of `step`, with the fewest slots in total that drop at most
    `target_drop` of the assignments in `loads` ([N, E] per-image loads, see `token_loads`), among the images of
    every size (T) alike.

    Trained routers do not share an image's tokens evenly, and random ones far less: one expert takes half of them,
    another a tenth, the same ones in most images. One factor for every expert must cover the busiest one and leaves
    the others' buffers mostly empty; a factor per expert sizes each buffer to its own loads. The fit starts with
    every expert at the smallest factor that drops nothing, then takes one step off, again and again, the expert
    whose step adds the fewest drops while the drops of each image size stay within the target. Images of another
    size are another input (a static export's square, the validator's padded batches) whose padding routes
    differently, so each keeps to the target on its own. The slots never total more than `max_factor` (the
    configured eval factor) gives every expert: if the target needs more, steps come off past it, still the
    cheapest first, until they fit. An expert that no image chose gets 0 slots.
    """
    if not 0 <= target_drop < 1:
        raise ValueError(f"target_drop={target_drop!r}, use a share of assignments 0 <= target_drop < 1")
    if loads.numel() == 0 or loads.sum() == 0:
        raise ValueError("capacity calibration needs the loads of at least one routed image")
    num_experts = loads.shape[-1]
    grid = [round(i * step, 6) for i in range(math.ceil(num_experts / top_k / step) + 1)]  # up to C = T
    capacity = _capacity_table(loads, top_k, grid)  # [N, G]
    token_counts, size_of_image = _image_sizes(loads, top_k)
    sizes = len(token_counts)
    budget = [target_drop * loads[size_of_image == i].sum().item() for i in range(sizes)]

    def per_size(d: torch.Tensor) -> list[list[int]]:  # [N, G] drops -> [G][sizes] drops summed per image size
        return d.new_zeros(sizes, d.shape[1]).index_add_(0, size_of_image, d).t().tolist()

    # drops[e][g][i]: assignments expert e drops at grid factor g in images of size i, non-increasing in g; one
    # expert at a time keeps the memory at [N, G] (N*E*G int64 would be 0.6 GB at E=128 over a 240-image split)
    drops = [per_size((loads[:, e, None] - capacity).clamp(min=0)) for e in range(num_experts)]
    level = [next(g for g, d in enumerate(row) if not any(d)) for row in drops]  # C = T drops nothing
    ceiling = math.floor(num_experts * max_factor / step + 1e-6)  # the configured total, in steps
    dropped = [sum(row[g][i] for row, g in zip(drops, level)) for i in range(sizes)]
    while any(level):
        steps = []  # (added drops in all, expert, added drops per size) of every expert's next step down
        for e, g in enumerate(level):
            if g:
                added = [a - b for a, b in zip(drops[e][g - 1], drops[e][g])]
                steps.append((sum(added), e, added))
        within = [s for s in steps if all(d + a <= b for d, a, b in zip(dropped, s[2], budget))]
        if not within and sum(level) <= ceiling:
            break
        _, e, added = min(within or steps, key=lambda s: s[:2])
        level[e] -= 1
        dropped = [d + a for d, a in zip(dropped, added)]
    return [grid[g] for g in level]
