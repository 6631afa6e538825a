"""Eval capacity calibration: size each token-routed layer's expert buffers from the routing measured on images.

The configured eval capacity factor (2.0 by default) gives every expert buffer room for twice its fair share of an
image's tokens, and a static export computes those buffers in full, whether tokens fill them or not. Calibration
records, per image, how many top-k assignments each expert of each `MoEMlp` receives, and gives each expert of each
layer its own eval factor, a multiple of `CAPACITY_STEP`, so that the layer's buffers hold the fewest slots in all
that drop at most `target_drop` of its assignments among the images of each size (never more slots than the
configured factor gives; `routing.fit_capacity_factors`). An export traces the calibrated factors as constant
capacities, so its buffers shrink with them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import MoEMlp
from .routing import TARGET_DROP, capacity_drop_rate, fit_capacity_factors, token_loads


@dataclass
class CapacityFit:
    """Eval capacity of one token-routed layer, fitted on the calibration images.

    Attributes:
        factors: Calibrated eval capacity factor of each expert.
        drop_rate: Share of the layer's top-k assignments dropped at `factors`.
        configured: The configured eval factor (capacity_factor[1]), the ceiling of `mean_factor`.
        configured_drop_rate: Share dropped at `configured`.
    """

    factors: tuple[float, ...]
    drop_rate: float
    configured: float
    configured_drop_rate: float

    @property
    def mean_factor(self) -> float:
        """The layer's buffer slots as a multiple of its top-k assignments per image (k*T): what its experts cost,
        relative to a dense MLP at k=1, as one factor for every expert would."""
        return sum(self.factors) / len(self.factors)


@dataclass
class Calibration:
    """Result of `calibrate_capacity`: the images it ran, its passes, the target and every layer's fit by name."""

    images: int
    passes: int
    target_drop: float
    layers: dict[str, CapacityFit]

    @property
    def drop_rate(self) -> float:
        """Share of all token-routed assignments dropped at the calibrated factors (each layer routes k*T per image)."""
        return sum(f.drop_rate for f in self.layers.values()) / max(len(self.layers), 1)

    @property
    def configured_drop_rate(self) -> float:
        """The same at the configured eval factors."""
        return sum(f.configured_drop_rate for f in self.layers.values()) / max(len(self.layers), 1)

    def __str__(self) -> str:
        fits = ", ".join(
            f"{name} {f.configured:g} -> {f.mean_factor:.3g} on average (drops {f.configured_drop_rate:.2%} -> "
            f"{f.drop_rate:.2%})"
            for name, f in self.layers.items()
        )
        passes = f"{self.passes} pass{'es' * (self.passes != 1)}"
        target = f"target drop rate {self.target_drop:.2%}"
        return f"eval capacity calibrated on {self.images} images ({passes}, {target}): {fits}"

    def over_target(self) -> list[str]:
        """Layers that drop more than the target even at their configured factor."""
        return [name for name, f in self.layers.items() if f.drop_rate > self.target_drop]


def token_routed_layers(model: nn.Module) -> list[tuple[str, MoEMlp]]:
    """(module name, layer) of every token-routed MoE layer of `model`, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEMlp)]


def reset_capacity(model: nn.Module) -> None:
    """Put every token-routed layer of `model` back at its configured eval capacity factor."""
    for _, layer in token_routed_layers(model):
        layer.eval_capacity_factors = layer.capacity_factor[1]


@torch.no_grad()
def record_loads(
    model: nn.Module, layers: list[tuple[str, MoEMlp]], images: Iterable[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], int]:
    """Run `images` ([B, C, H, W] batches) through `model`; return each layer's [N, E] per-image loads and N."""
    loads: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    n = 0
    for x in images:
        model(x)
        for name, layer in layers:
            loads[name].append(token_loads(layer.routing.indices, layer.router.num_experts).cpu())
        n += x.shape[0]
    if not n:
        raise ValueError("capacity calibration needs at least one image, got none")
    return {name: torch.cat(v) for name, v in loads.items()}, n


def calibrate_capacity(
    model: nn.Module, images: Iterable[torch.Tensor], target_drop: float = TARGET_DROP
) -> Calibration:
    """Give every expert of every token-routed layer the eval capacity factor that `routing.fit_capacity_factors`
    fits to its loads on `images` (the fewest slots per layer that drop <= `target_drop` of its assignments), and
    return the fits.

    What a layer drops changes the input, and so the routing, of the layers after it. Calibration therefore runs in
    passes: the first with every layer at its configured eval factor, each next one with the factors fitted in the
    last, until they stop changing. A layer's loads depend only on the layers before it, so the passes settle after
    at most one per layer, and the reported drop rates are exact for `images` at the calibrated factors.

    Args:
        model: Any module holding `MoEMlp` layers (a ViT-MoE, a YOLO model with MoEC2PSA); run in eval, then put
            back in its mode.
        images: Re-iterable (a list, a DataLoader) batches [B, C, H, W] on the model's device, preprocessed as the
            model expects them.
        target_drop: Share of each layer's top-k assignments its capacity may drop, in the images of each size.
    """
    layers = token_routed_layers(model)
    if not layers:
        return Calibration(images=0, passes=0, target_drop=target_drop, layers={})
    reset_capacity(model)  # recalibration starts from the configured factors
    training = model.training
    model.eval()
    try:
        for passes in range(1, len(layers) + 1):
            loads, n = record_loads(model, layers, images)
            if passes == 1:
                configured = {name: capacity_drop_rate(loads[name], m.router.top_k, m.capacity_factor[1])
                              for name, m in layers}  # fmt: skip
            fitted = {
                name: fit_capacity_factors(loads[name], m.router.top_k, m.capacity_factor[1], target_drop)
                for name, m in layers
            }
            previous = [m.eval_capacity_factors for _, m in layers]
            for name, m in layers:
                m.eval_capacity_factors = fitted[name]
            if [m.eval_capacity_factors for _, m in layers] == previous:
                break
    finally:
        model.train(training)
    fits = {
        name: CapacityFit(
            factors=m.eval_capacity_factors,
            drop_rate=capacity_drop_rate(loads[name], m.router.top_k, m.eval_capacity_factors),
            configured=m.capacity_factor[1],
            configured_drop_rate=configured[name],
        )
        for name, m in layers
    }
    return Calibration(images=n, passes=passes, target_drop=target_drop, layers=fits)
