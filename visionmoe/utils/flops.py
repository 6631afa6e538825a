"""FLOP counting with torch.utils.flop_counter: counts what actually runs, so sparse layers report active FLOPs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def active_gflops(model: nn.Module, imgsz: int | tuple[int, int] | list[int] = 640, ch: int = 3) -> float:
    """GFLOPs of one eval forward of a single image; with per-image routing exactly k experts per block run."""
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    p = next(model.parameters())
    x = torch.zeros(1, ch, h, w, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
