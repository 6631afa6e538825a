"""Dispatch and combine for per-item routing, as explicit functions.

`sparse_mixture` runs each expert only on the items that chose it; `dense_mixture` is its reference, which runs
every expert on every item and weights by the gates (tests compare the two; export can emit it on request);
`batched_mixture` computes what `sparse_mixture` does with one call per expert layer instead of one per expert;
`static_mixture` is the export form of the sparse one: only chosen experts compute, with static shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.distributed as dist
from torch import nn

from .batched import BatchedRun
from .experts import MlpExperts


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
    order = torch.argsort(flat, stable=True)  # (item, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    items = order // k
    # One gather, one gate multiply and one scatter for all experts, not one of each per expert: at the small maps
    # of a detector's deep blocks every op's fixed cost counts, in the forward and again in the backward.
    ys = [expert(xe) for expert, xe, c in zip(experts, x[items].split(counts), counts) if c]
    y = torch.cat(ys) if len(ys) > 1 else ys[0]
    y = y * _expand_gates(gates.reshape(-1)[order], y)
    out = y.new_zeros((n, *y.shape[1:])).index_add(0, items, y)
    unused = [expert for expert, c in zip(experts, counts) if not c]
    return _join_unused(out, unused)


def _join_unused(out: torch.Tensor, unused: Sequence[nn.Module]) -> torch.Tensor:
    """`out`, with the experts no item chose joining the graph with an exact zero when DDP runs."""
    if unused and torch.is_grad_enabled() and dist.is_available() and dist.is_initialized():
        # DistributedDataParallel expects a gradient for every parameter; experts no item chose this step join
        # the graph with an exact zero instead of running.
        out = out + sum(p.sum() for expert in unused for p in expert.parameters()) * 0.0
    return out


def used_experts(indices: torch.Tensor, num_experts: int) -> tuple[list[int], list[int], torch.Tensor]:
    """Which experts some item chose: (counts [E] of (item, slot) pairs per expert, the used experts in order,
    position [E] mapping each used expert to its place among them), so that only those experts need to run."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).tolist()
    used = [e for e, c in enumerate(counts) if c]
    position = torch.zeros(num_experts, dtype=indices.dtype, device=indices.device)
    position[used] = torch.arange(len(used), device=indices.device)
    return counts, used, position


def batched_mixture(
    x: torch.Tensor, experts: Sequence[nn.Module], indices: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """`sparse_mixture` with one call per expert layer: each layer runs every (item, slot) pair at once.

    Convs run as one grouped conv (or batched matmul) over the pairs' gathered weights, and an expert's BatchNorm
    normalises over the items routed to it, as in `sparse_mixture` (see `batched.BatchedRun`). Only the chosen
    experts' weights are gathered, so the others get no gradient, as there. On CPU at imgsz 128 it measured slower
    than `sparse_mixture` (benchmarks/results/train_speed.md), so it is opt-in.

    Args:
        x: [N, ...] items (images).
        experts: E modules of one structure that `BatchedRun` knows, mapping [n, ...] to [n, ...out].
        indices: [N, k] chosen experts per item.
        gates: [N, k] their weights.

    Returns:
        [N, ...out] with out[i] = sum_j gates[i, j] * experts[indices[i, j]](x[i]).
    """
    counts, used, position = used_experts(indices, len(experts))
    chosen, used_counts = [experts[e] for e in used], [counts[e] for e in used]
    out = static_mixture(x, lambda xk, index: BatchedRun(index, used_counts)(chosen, xk), position[indices], gates)
    return _join_unused(out, [expert for expert, c in zip(experts, counts) if not c])


def dense_mixture(
    x: torch.Tensor, experts: Sequence[nn.Module], indices: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """Reference for `sparse_mixture`: every expert runs on every item, unchosen ones get weight 0."""
    ys = torch.stack([expert(x) for expert in experts], 1)  # [N, E, ...out]
    weights = torch.zeros(indices.shape[0], len(experts), dtype=gates.dtype, device=gates.device)
    weights = weights.scatter(1, indices, gates)
    return (ys * _expand_gates(weights, ys)).sum(1)


def static_mixture(
    x: torch.Tensor, experts: nn.Module, indices: torch.Tensor, gates: torch.Tensor | None
) -> torch.Tensor:
    """Export form of `sparse_mixture`: static shapes, only the chosen experts compute, no Python branches.

    Args:
        x: [N, ...] items (images).
        experts: module mapping (x [M, ...], index [M]) to [M, ...out], row m through expert index[m]
            (e.g. `GatheredExperts`, `BranchExperts`).
        indices: [N, k] chosen experts per item.
        gates: [N, k] their weights; None at k=1 for gates that are all 1 (`Router.unit_gates`).

    Returns:
        [N, ...out]; each slot's outputs line up with the items, so they combine by a weighted sum, with no scatter.
    """
    n, k = indices.shape
    if k == 1:  # the common case, without the copy of x and the reduction over slots in the graph
        y = experts(x, indices[:, 0])
        return y if gates is None else y * _expand_gates(gates[:, 0], y)
    xk = torch.cat([x] * k)  # [k*N, ...] slot-major; a Concat, since traced expand() leaves runtime shape ops
    y = experts(xk, indices.t().flatten()).unflatten(0, (k, n))  # [k, N, ...out]
    return (y * _expand_gates(gates.t(), y)).sum(0)


# Token routing. Each image's expert buffers are one [B, S, D] tensor, expert e's C_e slots in rows
# offset_e..offset_e + C_e (S = sum C_e); capacities are Python ints, so the offsets are constants in an export.
# `buffer_rows` places every assignment once; `dispatch_tokens` scatters tokens into those rows, experts (one module
# over stacked weights, e.g. `MlpExperts`) run on their rows in `run_experts`, and `combine_tokens` gathers the outputs
# back from the same rows. Dispatch and combine are branch-free with static shapes, so the same code runs eagerly and
# exports. They use `expand_as`, never `expand` with explicit sizes, which the legacy ONNX exporter leaves as shapes
# unknown until runtime. The per-token reference runs every expert on every token.


def buffer_rows(
    indices: torch.Tensor, slots: torch.Tensor, kept: torch.Tensor, capacities: Sequence[int]
) -> torch.Tensor:
    """Row of each assignment in the [B, S, D] expert buffers, computed once for dispatch and combine.

    Args:
        indices: [B, T, k] chosen experts.
        slots, kept: [B, T, k] buffer positions and whether they fit (see `routing.token_slots`).
        capacities: [E] slots per expert, C_e.

    Returns:
        [B, T, k]: its expert's offset plus its slot for a kept assignment; S = sum C_e, one past the last row, for a
        dropped one.
    """
    offsets = torch.tensor(list(accumulate(capacities, initial=0))[:-1], device=indices.device)
    return torch.where(kept, offsets[indices] + slots, sum(capacities))


def dispatch_tokens(x: torch.Tensor, rows: torch.Tensor, capacities: Sequence[int]) -> torch.Tensor:
    """Scatter each image's tokens into its experts' fixed-capacity buffers.

    Args:
        x: [B, T, D] tokens.
        rows: [B, T, k] buffer row of each assignment (`buffer_rows`).
        capacities: [E] slots per expert, C_e.

    Returns:
        [B, S, D], S = sum C_e; unfilled slots are zero. Dropped assignments all go to one spare row that is cut off,
        so the scatter is plain (no reduction) and no kept token is ever overwritten.
    """
    b, t, d = x.shape
    k = rows.shape[-1]
    spare = sum(capacities)
    src = x[:, torch.arange(t * k, device=x.device) // k]  # [B, T*k, D]: each token once per choice, token-major
    return x.new_zeros(b, spare + 1, d).scatter(1, rows.reshape(b, t * k, 1).expand_as(src), src)[:, :spare]


def run_experts(experts: MlpExperts, buffers: torch.Tensor, capacities: Sequence[int]) -> torch.Tensor:
    """Run each expert on its rows of the buffers: [B, S, D] -> [B, S, D'].

    Equal capacities run all experts at once, as batched matmuls over their stacked weights; unequal ones (calibrated
    per expert, see `nn.capacity`) run one expert after another on its own rows, skipping those with no slots.
    """
    if len(set(capacities)) == 1:
        return experts(buffers.unflatten(1, (len(capacities), capacities[0]))).flatten(1, 2)
    pieces, start = [], 0
    for e, c in enumerate(capacities):
        if c:
            pieces.append(experts(buffers[:, start : start + c], expert=e))
            start += c
    return torch.cat(pieces, 1)


def combine_tokens(y: torch.Tensor, rows: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Gather each token's expert outputs back from the buffers and weight them by their gates.

    Args:
        y: [B, S, D'] expert outputs per buffer row (see `dispatch_tokens`).
        rows: [B, T, k] as for `dispatch_tokens`; dropped assignments (row S) must have gate 0.
        gates: [B, T, k] gates of the chosen experts, 0 for dropped assignments (`gates * kept`).

    Returns:
        [B, T, D'] = sum over choices j of gates[t, j] * y[rows[t, j]]; 0 for a token whose every choice was dropped
        (the block's residual passes it on).
    """
    b, s, d = y.shape
    t, k = rows.shape[1:]
    # Dropped assignments read the last row, with gate 0. Min, not Clip: TensorRT's Clip takes no integer tensors.
    rows = torch.minimum(rows, torch.tensor(s - 1, device=rows.device)).reshape(b, t * k)
    rows = rows + torch.arange(b, device=y.device).unsqueeze(1) * s  # rows of the batch-flattened buffers
    picked = y.reshape(b * s, d)[rows].view(b, t, k, d)
    return (picked * gates.to(y.dtype).unsqueeze(-1)).sum(2)


def token_dense_mixture(
    x: torch.Tensor, experts: nn.Module, indices: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """Per-token reference for dispatch + combine: every expert runs on every token.

    Args:
        x: [B, T, D] tokens.
        experts: stacked experts with `num_experts` (E).
        indices: [B, T, k] chosen experts.
        gates: [B, T, k] their weights; pass `gates * kept` to drop the assignments the sparse path drops.

    Returns:
        [B, T, D'] with out[b, t] = sum_j gates[b, t, j] * expert_{indices[b, t, j]}(x[b, t]).
    """
    b, t = indices.shape[:2]
    ys = experts(x.unsqueeze(1))  # [B, E, T, D'], every token broadcast to every expert
    weights = gates.new_zeros(b, t, experts.num_experts).scatter(2, indices, gates)  # [B, T, E]
    return torch.einsum("bte,betd->btd", weights.to(ys.dtype), ys)
