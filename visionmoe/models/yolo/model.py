"""VisionMoE: the Ultralytics-style model object for MoE detectors (train, val, predict, export, info)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
from ultralytics.cfg import DEFAULT_CFG_DICT
from ultralytics.data.utils import IMG_FORMATS
from ultralytics.engine.model import Model
from ultralytics.models.yolo.detect import DetectionPredictor, DetectionValidator
from ultralytics.utils import RANK

from ...nn.settings import MoESettings
from ...nn.tasks import build_model, load_model_yaml
from .train import MoEDetectionTrainer

DEFAULT_MODEL = "visionmoe-yolo-n.yaml"


def check_image_files(source: Any) -> None:
    """Raise a one-line error for an image file (or list of them) that OpenCV cannot decode."""
    for item in source if isinstance(source, (list, tuple)) else [source]:
        if isinstance(item, (str, Path)) and Path(item).suffix[1:].lower() in IMG_FORMATS and Path(item).is_file():
            if not cv2.haveImageReader(str(item)):
                raise ValueError(f"cannot read image '{item}': it is corrupt or not an image; pass a readable image file")


class VisionMoE(Model):
    """Sparse Mixture-of-Experts detector with the Ultralytics model API.

    Examples:
        >>> model = VisionMoE("visionmoe-yolo-n.yaml", experts=8, top_k=1)
        >>> model.train(data="coco8.yaml", epochs=3)
        >>> results = model.predict("bus.jpg")
    """

    def __init__(self, model: str | Path = DEFAULT_MODEL, task: str | None = None, verbose: bool = False, **moe: Any):
        """Build from a model YAML (MoE settings may override its `moe:` section) or load a checkpoint."""
        MoESettings().replace(**moe)  # unknown or impossible settings fail here, with the valid keys named
        if moe and not str(model).lower().endswith((".yaml", ".yml")):
            raise ValueError(
                f"MoE settings {sorted(moe)} apply when building from a model YAML; '{model}' already fixes them"
            )
        self.moe_overrides = moe  # read by _new() and train(), which Model.__init__ and users call
        super().__init__(model=model, task=task, verbose=verbose)

    def _new(self, cfg: str, task: str | None = None, verbose: bool = False) -> None:
        """Build a new model from a visionmoe YAML (Ultralytics' loader does not know MoE YAMLs or their scales)."""
        cfg_dict = load_model_yaml(cfg, **self.moe_overrides)
        self.cfg = cfg
        self.task = task or "detect"
        self.model = build_model(cfg_dict, verbose=verbose and RANK == -1)
        self.overrides["model"] = self.cfg
        self.overrides["task"] = self.task
        self.model.args = {**DEFAULT_CFG_DICT, **self.overrides}  # lets export and predict run on a YAML model
        self.model.task = self.task
        self.model_name = cfg

    def predict(self, source: Any = None, stream: bool = False, predictor=None, **kwargs: Any):
        """Ultralytics predict, but an unreadable image file fails loudly instead of being skipped with a warning."""
        check_image_files(source)
        return super().predict(source, stream=stream, predictor=predictor, **kwargs)

    def train(self, trainer=None, **kwargs: Any):
        """Train with MoEDetectionTrainer; MoE settings given at construction reach the trainer's model build."""
        return super().train(trainer=trainer, **{**self.moe_overrides, **kwargs})

    @property
    def task_map(self) -> dict[str, dict[str, Any]]:
        return {
            "detect": {
                "model": build_model,
                "trainer": MoEDetectionTrainer,
                "validator": DetectionValidator,
                "predictor": DetectionPredictor,
            }
        }
