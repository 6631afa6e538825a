"""Task glue for visionmoe model families."""

from .yolo import MoEDetectionTrainer, VisionMoE

__all__ = ("MoEDetectionTrainer", "VisionMoE")
