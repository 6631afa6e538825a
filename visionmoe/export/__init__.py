"""Static sparse ONNX export of MoE models, and the checks that keep its graphs static."""

from .checks import check_static_graph, static_graph_problems
from .exporter import (
    DEFAULT_OPSET,
    EXPORT_DISPATCHES,
    EXPORT_KEYS,
    MoEExporter,
    default_dispatch,
    preflight_args,
    prepare,
)

__all__ = (
    "DEFAULT_OPSET",
    "EXPORT_DISPATCHES",
    "EXPORT_KEYS",
    "MoEExporter",
    "check_static_graph",
    "default_dispatch",
    "preflight_args",
    "prepare",
    "static_graph_problems",
)
