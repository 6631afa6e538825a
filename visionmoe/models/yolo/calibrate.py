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
    """Batches [B, 3, H, W] float in [0, 1] on `device` of one dataset split, without augmentation, re-iterable.

    Every image comes letterboxed to an imgsz square, as the input of a static export at imgsz; with `as_validated`,
    a second time as Ultralytics' validator loads it: in rect batches padded by half a stride on each side. Padding
    tokens claim expert capacity too, and the two inputs pad differently (a square image gets no border in the first
    and a grey ring in the second), so factors fitted on one of them can drop many times the target on the other.
    """

    def __init__(
        self,
        args: IterableSimpleNamespace,
        data: dict[str, Any],
        split: str,
        stride: int,
        device: torch.device,
        as_validated: bool = True,
    ):
        self.loaders = []
        for rect in (False, True) if as_validated else (False,):
            form = copy(args)
            form.rect = rect  # in val mode, rect batches get the validator's half-stride padding
            dataset = build_yolo_dataset(form, data[split], form.batch, data, mode="val", stride=stride, fraction=1.0)
            self.loaders.append(build_dataloader(dataset, form.batch, form.workers, shuffle=False, device=device))
        self.device = device

    def __len__(self) -> int:
        """Images in the split (each is yielded once per input form)."""
        return len(self.loaders[0].dataset)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for loader in self.loaders:
            for batch in loader:
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
    images = SplitImages(args, data, split, stride, device)
    calibration = calibrate_capacity(model, images, target_drop)
    LOGGER.info(
        f"{colorstr('visionmoe:')} {calibration} (the {len(images)} '{split}' images, each letterboxed square as a "
        f"static export at {args.imgsz} px sees it and padded as Ultralytics' val pads it)"
    )
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
