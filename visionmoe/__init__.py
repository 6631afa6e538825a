"""visionmoe: sparse Mixture-of-Experts object detectors on top of Ultralytics."""

__version__ = "0.1.0"

from .models import MoEDetectionTrainer, VisionMoE
from .nn import MoEDetectionModel, MoESettings

__all__ = ("MoEDetectionModel", "MoEDetectionTrainer", "MoESettings", "VisionMoE", "__version__")
