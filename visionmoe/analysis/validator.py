"""RoutingValidator: Ultralytics detection validation that also records every MoE layer's routing."""

from __future__ import annotations

from typing import Any

import torch
from ultralytics.models.yolo.detect import DetectionValidator

from ..nn.tasks import MoEModel
from .domains import load_domains
from .recorder import RoutingRecorder


class RoutingValidator(DetectionValidator):
    """DetectionValidator whose `routing` recorder reads each MoE block's routing after every val batch's forward.

    Dataloader, letterboxing, device and precision are the stock validator's; only metrics bookkeeping is added.
    `routing` is rebuilt at every run, so after a run it holds that run's routing.
    """

    def __init__(self, dataloader=None, save_dir=None, args=None, _callbacks=None, examples: int = 8):
        """examples: example images per expert (per-image routing) or per layer (token routing) for routing maps."""
        super().__init__(dataloader, save_dir, args, _callbacks)
        self.examples = examples
        self.routing: RoutingRecorder | None = None

    def init_metrics(self, model: torch.nn.Module) -> None:
        """Stock metrics, plus a fresh recorder on the MoE model inside `model` (possibly an AutoBackend)."""
        super().init_metrics(model)
        moe = model if isinstance(model, MoEModel) else getattr(model, "model", None)  # AutoBackend wraps it
        if not isinstance(moe, MoEModel):
            raise ValueError(f"{type(model).__name__} has no MoE layers: routing analysis needs a visionmoe model")
        self.routing = RoutingRecorder(moe.named_moe_blocks(), self.names, load_domains(self.data), self.examples)

    def update_metrics(self, preds: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> None:
        """Stock metrics, then this batch's routing (the blocks still hold it from the forward pass)."""
        super().update_metrics(preds, batch)
        self.routing.update(batch)
