"""Static sparse export of MoE models (ONNX, and OpenVINO, TorchScript, TensorRT from it), and the graph checks."""

from .checks import check_static_graph, static_graph_problems
from .exporter import (
    DEFAULT_OPSET,
    EXPORT_DISPATCHES,
    EXPORT_FORMATS,
    EXPORT_KEYS,
    MoEExporter,
    default_dispatch,
    preflight_args,
    prepare,
)
from .formats import onnx_to_openvino, tensorrt_available

__all__ = (
    "DEFAULT_OPSET",
    "EXPORT_DISPATCHES",
    "EXPORT_FORMATS",
    "EXPORT_KEYS",
    "MoEExporter",
    "check_static_graph",
    "default_dispatch",
    "preflight_args",
    "prepare",
    "onnx_to_openvino",
    "static_graph_problems",
    "tensorrt_available",
)
