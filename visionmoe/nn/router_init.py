"""Cluster-initialised routers: k-means over a block's router inputs, turned into a linear gate.

A router that starts random and near uniform sends each expert a near-random share of the images, so experts see the
same data and nothing specialises. Fitting E clusters to the router's inputs on un-augmented training images and
starting the gate as a nearest-centroid classifier gives each expert one region of feature space from its first step.
Pure functions on tensors; the trainer gathers the features (see `MoEDetectionTrainer`).

Shapes: N items (images), D router input features, E experts (clusters).
"""

from __future__ import annotations

import math

import torch

TARGET_CONFIDENCE = 0.8  # mean top-1 probability of an initialised gate: routes its clusters, still trains


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50, restarts: int = 4) -> torch.Tensor:
    """k-means++ started Lloyd iterations; returns the centroids [k, D] of the restart with the lowest inertia.

    Args:
        x: [N, D] points, N >= k.
        k: Number of clusters.
        generator: Seeds the k-means++ draws, so that a training seed fixes the result.
    """
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}")
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        centroids = x[torch.randint(x.shape[0], (1,), generator=generator)]
        while centroids.shape[0] < k:  # k-means++: next centre drawn with probability ~ squared distance
            d2 = torch.cdist(x, centroids).square().min(1).values
            pick = torch.multinomial(d2 + 1e-12, 1, generator=generator)
            centroids = torch.cat((centroids, x[pick]))
        for _ in range(iters):
            labels = torch.cdist(x, centroids).argmin(1)
            moved = torch.stack([x[labels == j].mean(0) if (labels == j).any() else centroids[j] for j in range(k)])
            if torch.allclose(moved, centroids):
                break
            centroids = moved
        inertia = torch.cdist(x, centroids).square().min(1).values.sum().item()
        if inertia < best_inertia:
            best, best_inertia = centroids, inertia
    return best


def nearest_centroid_gate(
    features: torch.Tensor, experts: int, generator: torch.Generator, confidence: float = TARGET_CONFIDENCE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear gate (weight [E, D], bias [E]) whose argmax is the nearest k-means centroid of standardised features.

    On standardised z = (x - m) / s, the nearest centroid maximises z.mu_e - |mu_e|^2 / 2, which is linear in x; the
    logits are scaled by 1/T, with T set so that the mean top-1 softmax probability over `features` is `confidence`
    (bisection on log T).

    Args:
        features: [N, D] router inputs of N training images.
        experts: E, the number of clusters and logits.
        generator: Seeds k-means.
        confidence: Target mean top-1 probability, in (1/E, 1).
    """
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    centroids = kmeans((x - mean) / std, experts, generator)
    weight = centroids / std  # z.mu = x.(mu / s) - m.(mu / s)
    bias = -(weight * mean).sum(1) - centroids.square().sum(1) / 2
    logits = x @ weight.T + bias
    lo, hi = -10.0, 10.0  # log T
    for _ in range(60):
        mid = (lo + hi) / 2
        top = (logits / math.exp(mid)).softmax(1).max(1).values.mean()
        lo, hi = (mid, hi) if top > confidence else (lo, mid)
    scale = math.exp(-(lo + hi) / 2)
    return (weight * scale).float(), (bias * scale).float()
