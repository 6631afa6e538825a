"""The 'branch' export form: each `visionmoe::ExpertSwitch` placeholder becomes an `If` tree over the experts.

A placeholder (x [1, ...], index [1]) -> [1, ...out], one per (image, slot) of a block (see `ExpertSwitch` in
nn/static.py), becomes a balanced binary tree of `If` nodes over the block's E experts: the node over experts
[lo, hi) tests index < (lo + hi) // 2, so a tree has E - 1 `If` nodes, of which ceil(log2 E) run. Each leaf is the
expert's own graph, exported alone with the legacy tracer at the placeholder's input shape, with its tensors renamed
under the placeholder's scope, its input wired to the outer-scope x and its (BN-folded) weights as constants of the
leaf subgraph. ONNX Runtime and TensorRT (IIfConditional) run only the taken branch, and every conv keeps constant
weights. The leaves of one block share one export per input shape.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import helper, numpy_helper
from torch import nn

DOMAIN, OP = "visionmoe", "ExpertSwitch"


def expert_graph(expert: nn.Module, shape: Sequence[int], opset: int) -> onnx.GraphProto:
    """ONNX graph of one expert, input 'x' of `shape` -> output 'y', traced as Ultralytics traces the model."""
    f = io.BytesIO()
    x = next(expert.parameters()).new_zeros(shape)
    torch.onnx.export(expert, x, f, opset_version=opset, input_names=["x"], output_names=["y"], dynamo=False)
    return onnx.load_from_string(f.getvalue()).graph


def _tag(lo: int, hi: int) -> str:
    """Scope of the subtree over experts [lo, hi) within its placeholder's scope."""
    return f"e{lo}" if hi - lo == 1 else f"e{lo}-{hi - 1}"


def _leaf(expert: onnx.GraphProto, scope: str, x: str, y: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The expert's nodes and weights, renamed under `scope`, reading the outer tensor `x` and writing `y`."""
    g = onnx.GraphProto()
    g.CopyFrom(expert)
    wired = {g.input[0].name: x, g.output[0].name: y}

    def rename(name: str) -> str:
        return wired.get(name) or (name and f"{scope}/{name.lstrip('/')}")  # '' marks an omitted optional input

    for node in g.node:
        node.name = rename(node.name)
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
    for weight in g.initializer:
        weight.name = rename(weight.name)
    return list(g.node), list(g.initializer)


def _select(
    experts: Sequence[onnx.GraphProto], lo: int, hi: int, index: str, x: str, y: str, scope: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and constants that write y = expert_index(x) for a scalar int64 `index` in [lo, hi)."""
    here = f"{scope}/{_tag(lo, hi)}"
    if hi - lo == 1:
        return _leaf(experts[lo], here, x, y)
    mid, branches = (lo + hi) // 2, []
    for a, b in ((lo, mid), (mid, hi)):
        out = f"{scope}/{_tag(a, b)}/y"  # distinct names for the branches' outputs, as TensorRT requires
        nodes, weights = _select(experts, a, b, index, x, out, scope)
        info = helper.make_value_info(out, experts[a].output[0].type)
        branches.append(helper.make_graph(nodes, f"{here}/{'then' if a == lo else 'else'}", [], [info], weights))
    bound = numpy_helper.from_array(np.array(mid, np.int64), f"{here}/mid")
    less = helper.make_node("Less", [index, bound.name], [f"{here}/below"], f"{here}/Less")
    then, other = branches
    branch = helper.make_node("If", [less.output[0]], [y], f"{here}/If", then_branch=then, else_branch=other)
    return [less, branch], [bound]


def sink_initializers(model: ir.Model) -> None:
    """Move each main-graph initializer that only `If` branches use into the innermost graphs that use it, in place.

    onnxscript's optimizer lifts subgraph initializers into the main graph. In the branch form each expert's weights
    belong to its branch, where every parser sees them as that branch's constants (OpenVINO, for one, turns
    outer-scope tensors into inputs of the If body). A tensor several branches share (an expert in several slots,
    identical experts merged by deduplication) gets one copy in each. Initializers that the optimizer's rewrites left
    unused in a branch are dropped.
    """
    main = model.graph
    for value in list(main.initializers.values()):
        graphs = {use.node.graph for use in value.uses()}
        if main in graphs or value.is_graph_output():
            continue
        for graph in graphs:
            local = ir.Value(
                name=value.name if len(graphs) == 1 else f"{graph.name}/{value.name}",
                shape=value.shape,
                type=value.type,
                const_value=value.const_value,
            )
            graph.register_initializer(local)
            for node, i in value.uses():
                if node.graph is graph:
                    node.replace_input_with(i, local)
        main.initializers.pop(value.name)


def expand_switches(path: str | Path, experts: Mapping[str, Sequence[nn.Module]], opset: int) -> int:
    """Replace every ExpertSwitch of the ONNX file at `path` by an `If` tree, in place; returns how many there were.

    Args:
        path: ONNX file traced from a model in 'branch' dispatch.
        experts: each block's experts (BN-folded, see `BranchExperts`) by the block name the placeholders carry.
        opset: the file's default-domain opset, used for the experts' graphs too.
    """
    model = onnx.load(str(path))
    graph, nodes, types, count = model.graph, [], {}, Counter()
    graphs: dict[tuple[str, tuple[int, ...]], list[onnx.GraphProto]] = {}  # a block's experts' graphs at one shape
    for node in graph.node:
        if (node.domain, node.op_type) != (DOMAIN, OP):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        block, shape = attrs["block"].decode(), tuple(attrs["shape"])
        if block not in experts:
            raise ValueError(f"{OP} of block '{block}' has no experts to export, known blocks: {list(experts)}")
        key = (block, shape)
        if key not in graphs:
            graphs[key] = [expert_graph(expert, shape, opset) for expert in experts[block]]
        scope = f"/{block}/branch{count[block]}"  # one scope per placeholder (image, slot) of the block
        count[block] += 1
        (x, index), y = node.input, node.output[0]
        axes = numpy_helper.from_array(np.array([0], np.int64), f"{scope}/axes")
        squeeze = helper.make_node("Squeeze", [index, axes.name], [f"{scope}/index"], f"{scope}/Squeeze")  # [1] -> []
        tree, weights = _select(graphs[key], 0, len(graphs[key]), squeeze.output[0], x, y, scope)
        nodes += [squeeze, *tree]
        graph.initializer.extend([axes, *weights])
        types[y] = graphs[key][0].output[0].type
    del graph.node[:]
    graph.node.extend(nodes)
    # The traced file left the placeholders' outputs untyped; the If trees' outputs take their experts' types
    kept = [v for v in graph.value_info if v.name not in types]
    del graph.value_info[:]
    graph.value_info.extend([*kept, *(helper.make_value_info(y, t) for y, t in types.items())])
    kept_opsets = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept_opsets)
    onnx.save(model, str(path))
    return len(types)
