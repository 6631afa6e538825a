"""YOLO-MoE detection: model wrapper and trainer."""

from .model import VisionMoE
from .train import MoEDetectionTrainer

__all__ = ("MoEDetectionTrainer", "VisionMoE")
