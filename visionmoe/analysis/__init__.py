"""Routing analysis: expert utilisation during training."""

from .utilisation import UtilisationTracker

__all__ = ("UtilisationTracker",)
