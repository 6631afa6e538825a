"""Sparse MoE building blocks: settings, routing math, dispatch, router, experts, blocks and models."""

from .blocks import MOE_BLOCKS, MoEBlock, MoEC3k2
from .dispatch import dense_mixture, sparse_mixture
from .experts import BottleneckStack
from .router import Router
from .routing import Routing, route
from .settings import MoESettings
from .tasks import MoEDetectionModel, load_model_yaml

__all__ = (
    "MOE_BLOCKS",
    "BottleneckStack",
    "MoEBlock",
    "MoEC3k2",
    "MoEDetectionModel",
    "MoESettings",
    "Router",
    "Routing",
    "dense_mixture",
    "load_model_yaml",
    "route",
    "sparse_mixture",
)
