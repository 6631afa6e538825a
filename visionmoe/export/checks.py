"""Checks that an exported ONNX graph is static and TensorRT-friendly, run on every export and in the tests."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import numpy_helper

# Ops whose output shape or control flow depends on data (NonZero, Loop, If, ...) and ops TensorRT lacks or gets wrong
FORBIDDEN_OPS = frozenset({"NonZero", "Loop", "If", "Scan", "Unique", "Compress", "NonMaxSuppression"})
SCATTER_OPS = frozenset({"ScatterND", "ScatterElements"})
TOPK_MAX = 3840  # TensorRT's limit on TopK's K


def constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Tensors fixed at export: initializers and Constant node outputs, by name."""
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                found[node.output[0]] = value
    return found


def static_graph_problems(model: onnx.ModelProto | str | Path, opset: int | None = None) -> list[str]:
    """Everything that keeps `model` from being a static, TensorRT-friendly graph; empty when it is one.

    Checks: onnx.checker passes; after shape inference every tensor has a concrete shape; no data-dependent or
    control-flow ops; scatters carry no reduction; each TopK has a constant 0 < K <= min(axis length, 3840);
    the default-domain opset equals `opset` when given.
    """
    model = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    problems = []
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        problems.append(f"onnx.checker failed: {' '.join(str(e).split())[:300]}")
    version = next((o.version for o in model.opset_import if o.domain in {"", "ai.onnx"}), None)
    if opset is not None and version != opset:
        problems.append(f"opset {version}, expected {opset}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        return [*problems, f"shape inference failed: {' '.join(str(e).split())[:300]}"]

    g = inferred.graph
    shapes = {v.name: v.type.tensor_type.shape for v in (*g.input, *g.value_info, *g.output)}
    for name, t in constants(inferred).items():
        shapes.setdefault(name, onnx.TensorShapeProto(dim=[onnx.TensorShapeProto.Dimension(dim_value=d) for d in t.dims]))
    const = constants(inferred)
    for node in g.node:
        where = f"{node.op_type} node '{node.name}'"
        if node.op_type in FORBIDDEN_OPS:
            problems.append(f"{where} is not allowed in a static export")
        if node.op_type in SCATTER_OPS:
            reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            if reduction != "none":
                problems.append(f"{where} scatters with reduction '{reduction}'")
        if node.op_type == "TopK":
            k = const.get(node.input[1])
            if k is None:
                problems.append(f"{where} has a K computed at runtime")
            else:
                k = int(numpy_helper.to_array(k).reshape(-1)[0])
                axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
                dims = shapes.get(node.input[0])
                n = dims.dim[axis].dim_value if dims is not None and len(dims.dim) else 0
                if not 0 < k <= min(n or k, TOPK_MAX):
                    problems.append(f"{where} has K={k} outside 1..min({n}, {TOPK_MAX})")
        for out in node.output:
            shape = shapes.get(out)
            if out and (shape is None or not all(d.HasField("dim_value") and d.dim_value > 0 for d in shape.dim)):
                dims = "unknown" if shape is None else [d.dim_value or d.dim_param or "?" for d in shape.dim]
                problems.append(f"{where} output '{out}' has no concrete shape ({dims})")
    return problems


def check_static_graph(model: onnx.ModelProto | str | Path, opset: int | None = None) -> None:
    """Raise ValueError listing the problems `static_graph_problems` finds."""
    problems = static_graph_problems(model, opset)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"exported graph is not static: {'; '.join(problems[:3])}{more}")
