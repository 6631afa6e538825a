"""Sparse MoE building blocks: settings, routing math, dispatch, router, experts, blocks and models."""

from .blocks import MOE_BLOCKS, MoEBlock, MoEC2PSA, MoEC3k2, MoEMlp
from .dispatch import dense_mixture, sparse_mixture
from .experts import BottleneckStack, MlpExperts
from .router import Router
from .routing import Routing, route
from .settings import MoESettings
from .tasks import MoEDetectionModel, MoEViTDetectionModel, build_model, load_model_yaml
from .vit import Attention, Mlp, PatchEmbed, SimpleFeaturePyramid, ViT, ViTBlock

__all__ = (
    "MOE_BLOCKS",
    "BottleneckStack",
    "MlpExperts",
    "MoEBlock",
    "MoEC2PSA",
    "MoEC3k2",
    "MoEDetectionModel",
    "MoEMlp",
    "MoEViTDetectionModel",
    "MoESettings",
    "Router",
    "Routing",
    "ViT",
    "build_model",
    "dense_mixture",
    "load_model_yaml",
    "route",
    "sparse_mixture",
)


def _allow_safe_loading() -> None:
    """Allow visionmoe's classes in `torch.load(weights_only=True)`, which ULTRALYTICS_SAFE_LOAD=1 uses.

    `add_safe_globals` is torch's documented allow-list; it changes nothing for any other class.
    """
    import torch

    torch.serialization.add_safe_globals([MoEDetectionModel, MoEC3k2, Router, BottleneckStack])
    torch.serialization.add_safe_globals(
        [MoEViTDetectionModel, ViT, PatchEmbed, Attention, Mlp, ViTBlock, SimpleFeaturePyramid]
        + [MoEMlp, MlpExperts, MoEC2PSA]
    )


_allow_safe_loading()
