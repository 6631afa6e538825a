"""Routing analysis: expert utilisation during training, and utilisation, specialisation and routing maps on a
dataset (`analyze`)."""

from .analyzer import analyze
from .metrics import entropy, mutual_information, normalized_mutual_information
from .recorder import RoutingRecorder
from .utilisation import UtilisationTracker
from .validator import RoutingValidator

__all__ = (
    "RoutingRecorder",
    "RoutingValidator",
    "UtilisationTracker",
    "analyze",
    "entropy",
    "mutual_information",
    "normalized_mutual_information",
)
