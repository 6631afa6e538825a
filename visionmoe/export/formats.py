"""Deployment formats built from the checked static ONNX graph (OpenVINO), or needing hardware (TensorRT).

Ultralytics converts to OpenVINO by tracing the PyTorch model, which would see neither the ONNX `If` branches of
the branch form nor the checks run on the ONNX file; converting that checked file instead keeps one graph, the
one that was tested, behind every format.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from ultralytics.utils import YAML


def tensorrt_available() -> bool:
    """TensorRT engines build only where the tensorrt package and a CUDA GPU are both present."""
    return torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


def onnx_to_openvino(onnx_file: str | Path, metadata: dict[str, Any]) -> str:
    """Convert a static ONNX file to OpenVINO IR in `<stem>_openvino_model/` beside it, with the metadata.yaml that
    Ultralytics' AutoBackend reads; returns the folder. FP32 weights: routers must not run in reduced precision."""
    import openvino as ov

    onnx_file = Path(onnx_file)
    folder = onnx_file.with_name(f"{onnx_file.stem}_openvino_model")
    folder.mkdir(parents=True, exist_ok=True)
    ov_model = ov.convert_model(str(onnx_file))
    ov_model.set_rt_info("YOLO", ["model_info", "model_type"])
    ov_model.set_rt_info([v.replace(" ", "_") for v in metadata["names"].values()], ["model_info", "labels"])
    ov.save_model(ov_model, str(folder / onnx_file.with_suffix(".xml").name), compress_to_fp16=False)
    YAML.save(folder / "metadata.yaml", metadata)
    return str(folder)
