"""Dispatch and combine for per-item routing, as explicit functions.

`sparse_mixture` runs each expert only on the items that chose it; `dense_mixture` is its reference, which runs
every expert on every item and weights by the gates (tests compare the two; export can emit it on request).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn


def _expand_gates(gates: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return gates.to(like.dtype).view(*gates.shape, *(1,) * (like.dim() - gates.dim()))


def sparse_mixture(
    x: torch.Tensor, experts: Sequence[nn.Module], indices: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """Top-k mixture where only the chosen experts compute.

    Args:
        x: [N, ...] items (images).
        experts: E modules mapping [n, ...] to [n, ...out].
        indices: [N, k] chosen experts per item.
        gates: [N, k] their weights.

    Returns:
        [N, ...out] with out[i] = sum_j gates[i, j] * experts[indices[i, j]](x[i]).
    """
    n, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    item_of = (order // k).split(counts)
    gate_of = gates.reshape(-1)[order].split(counts)
    out, unused = None, []
    for expert, items, g in zip(experts, item_of, gate_of):
        if items.numel() == 0:
            unused.append(expert)
            continue
        y = expert(x[items])
        y = y * _expand_gates(g, y)
        out = y.new_zeros((n, *y.shape[1:])) if out is None else out
        out = out.index_add(0, items, y)
    if unused and torch.is_grad_enabled() and dist.is_available() and dist.is_initialized():
        # DistributedDataParallel expects a gradient for every parameter; experts no item chose this step join
        # the graph with an exact zero instead of running.
        out = out + sum(p.sum() for expert in unused for p in expert.parameters()) * 0.0
    return out


def dense_mixture(
    x: torch.Tensor, experts: Sequence[nn.Module], indices: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """Reference for `sparse_mixture`: every expert runs on every item, unchosen ones get weight 0."""
    ys = torch.stack([expert(x) for expert in experts], 1)  # [N, E, ...out]
    weights = torch.zeros(indices.shape[0], len(experts), dtype=gates.dtype, device=gates.device)
    weights = weights.scatter(1, indices, gates)
    return (ys * _expand_gates(weights, ys)).sum(1)
