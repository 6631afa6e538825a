"""Eval capacity calibration on a dataset split, for `VisionMoE.calibrate` and the end of training."""

from __future__ import annotations

from collections.abc import Iterator
from copy import copy, deepcopy
from pathlib import Path
from typing import Any

import torch
from ultralytics.data import build_dataloader, build_yolo_dataset
from ultralytics.utils import LOGGER, IterableSimpleNamespace, colorstr
from ultralytics.utils.patches import torch_load

from ...nn.capacity import Calibration, calibrate_capacity, token_routed_layers
from ...nn.routing import TARGET_DROP
from ...utils import replaced_atomically


class SplitImages:
    """Batches [B, 3, imgsz, imgsz] float in [0, 1] on `device` of one dataset split, re-iterable.

    Without augmentation, and letterboxed to a square (never `rect`) like the input of a static export at imgsz:
    its padding tokens claim expert capacity too.
    """

    def __init__(
        self, args: IterableSimpleNamespace, data: dict[str, Any], split: str, stride: int, device: torch.device
    ):
        args = copy(args)
        args.rect = False
        dataset = build_yolo_dataset(args, data[split], args.batch, data, mode="val", stride=stride, fraction=1.0)
        self.loader = build_dataloader(dataset, args.batch, args.workers, shuffle=False, device=device)
        self.device = device

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.loader:
            yield batch["img"].to(self.device).float() / 255


def calibrate_split(
    model: torch.nn.Module,
    args: IterableSimpleNamespace,
    data: dict[str, Any],
    device: torch.device,
    target_drop: float = TARGET_DROP,
) -> Calibration:
    """Calibrate `model` (fp32, on `device`) in place on split `args.split` (default val) of `data`, at `args.imgsz`
    and `args.batch`, and log the factors."""
    split = args.split or "val"
    stride = max(int(model.stride.max()), 32)
    calibration = calibrate_capacity(model, SplitImages(args, data, split, stride, device), target_drop)
    LOGGER.info(f"{colorstr('visionmoe:')} {calibration} ('{split}' split, {args.imgsz} px)")
    if calibration.over_target():
        LOGGER.warning(
            f"{', '.join(calibration.over_target())} drop over {calibration.target_drop:.2%} of their assignments even "
            f"with the slots of the configured eval capacity factor: routing crowds each image's tokens onto a few "
            f"experts (see `visionmoe analyze`); a larger capacity_factor[1] keeps more of them"
        )
    return calibration


def calibrate_checkpoint(
    path: Path,
    args: IterableSimpleNamespace,
    data: dict[str, Any],
    device: torch.device,
    target_drop: float = TARGET_DROP,
) -> Calibration:
    """Calibrate the model of a training checkpoint (its EMA, as saved) on the val split and rewrite the file
    atomically, so that validating, predicting with or exporting it uses the calibrated factors."""
    ckpt = torch_load(path, map_location="cpu")
    model = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    fitted = deepcopy(model).float().to(device)  # checkpoints hold fp16 weights; route in the precision of val
    args = copy(args)
    args.split = "val"
    calibration = calibrate_split(fitted, args, data, device, target_drop)
    for (_, layer), (_, fit) in zip(token_routed_layers(model), token_routed_layers(fitted)):
        layer.eval_capacity_factors = fit.eval_capacity_factors
    with replaced_atomically(path) as partial:
        torch.save(ckpt, partial)
    return calibration
