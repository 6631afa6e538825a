"""Checks that an exported ONNX graph is static and TensorRT-friendly, run on every export and in the tests.

Subgraphs (the branches of `If`) are checked as the main graph is, with the tensors of enclosing graphs in scope.
"""

from __future__ import annotations

from collections import ChainMap
from pathlib import Path

import onnx
from onnx import numpy_helper

from ..nn.routing import TOPK_MAX

# Ops whose output shape or control flow depends on data (NonZero, Loop, If, ...) and ops TensorRT lacks or gets
# wrong. `If` is allowed only where the caller allows it (the branch form, whose branches have the same static shapes)
FORBIDDEN_OPS = frozenset({"NonZero", "Loop", "If", "Scan", "Unique", "Compress", "NonMaxSuppression"})
SCATTER_OPS = frozenset({"ScatterND", "ScatterElements"})


def constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Tensors fixed at export in `graph` itself (not in its subgraphs): initializers and Constant outputs, by name."""
    found = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                found[node.output[0]] = value
    return found


def _shapes(graph: onnx.GraphProto, const: dict[str, onnx.TensorProto]) -> dict[str, onnx.TensorShapeProto]:
    """Shapes of `graph`'s own tensors: those shape inference recorded, and those of its constants."""
    dims = onnx.TensorShapeProto.Dimension
    shapes = {n: onnx.TensorShapeProto(dim=[dims(dim_value=d) for d in t.dims]) for n, t in const.items()}
    shapes.update({v.name: v.type.tensor_type.shape for v in (*graph.input, *graph.value_info, *graph.output)})
    return shapes


def _graph_problems(
    graph: onnx.GraphProto, scope: ChainMap, shapes: ChainMap, forbidden: frozenset[str], constant_conv_weights: bool
) -> list[str]:
    """Problems of the nodes of `graph` and of their subgraphs; `scope` and `shapes` hold the enclosing graphs'."""
    scope = scope.new_child(constants(graph))
    shapes = shapes.new_child(_shapes(graph, scope.maps[0]))
    problems = []
    for node in graph.node:
        where = f"{node.op_type} node '{node.name}'"
        if node.op_type in forbidden:
            problems.append(f"{where} is not allowed in a static export")
        if node.op_type in SCATTER_OPS:
            reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            if reduction != "none":
                problems.append(f"{where} scatters with reduction '{reduction}'")
        if node.op_type == "TopK":
            k = scope.get(node.input[1])
            if k is None:
                problems.append(f"{where} has a K computed at runtime")
            else:
                k = int(numpy_helper.to_array(k).reshape(-1)[0])
                axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
                dims = shapes.get(node.input[0])
                n = dims.dim[axis].dim_value if dims is not None and len(dims.dim) else 0
                if not 0 < k <= min(n or k, TOPK_MAX):
                    problems.append(f"{where} has K={k} outside 1..min({n}, {TOPK_MAX})")
        if constant_conv_weights and node.op_type == "Conv":
            runtime = [name for name in node.input[1:] if name and name not in scope]
            if runtime:
                problems.append(f"{where} has weights computed at runtime: {', '.join(runtime)}")
        for out in node.output:
            shape = shapes.get(out)
            if out and (shape is None or not all(d.HasField("dim_value") and d.dim_value > 0 for d in shape.dim)):
                dims = "unknown" if shape is None else [d.dim_value or d.dim_param or "?" for d in shape.dim]
                problems.append(f"{where} output '{out}' has no concrete shape ({dims})")
        for attr in node.attribute:
            for sub in (attr.g,) if attr.HasField("g") else attr.graphs:
                problems += _graph_problems(sub, scope, shapes, forbidden, constant_conv_weights)
    return problems


def static_graph_problems(
    model: onnx.ModelProto | str | Path,
    opset: int | None = None,
    allow_if: bool = False,
    constant_conv_weights: bool = False,
) -> list[str]:
    """Everything that keeps `model` from being a static, TensorRT-friendly graph; empty when it is one.

    Checks, in the main graph and in every subgraph: onnx.checker passes; after shape inference every tensor has a
    concrete shape; no data-dependent or control-flow ops (`If` only with `allow_if`); scatters carry no reduction;
    each TopK has a constant 0 < K <= min(axis length, 3840); with `constant_conv_weights`, every Conv's weight and
    bias are constants (initializers or Constant outputs of its graph or an enclosing one); the default-domain
    opset equals `opset` when given.
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
    forbidden = FORBIDDEN_OPS - {"If"} if allow_if else FORBIDDEN_OPS
    return problems + _graph_problems(inferred.graph, ChainMap(), ChainMap(), forbidden, constant_conv_weights)


def check_static_graph(
    model: onnx.ModelProto | str | Path,
    opset: int | None = None,
    allow_if: bool = False,
    constant_conv_weights: bool = False,
) -> None:
    """Raise ValueError listing the problems `static_graph_problems` finds."""
    problems = static_graph_problems(model, opset, allow_if, constant_conv_weights)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"exported graph is not static: {'; '.join(problems[:3])}{more}")
