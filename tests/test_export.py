"""Static sparse ONNX export in both sparse forms ('gather' at batch 4, 'branch' at batch 1): equality with PyTorch
(outputs and chosen experts), static graph checks, sparsity, refusals, the Ultralytics AutoBackend round trip, the
CLI, and the torch-free deployment kit in export/.

Written over `MoEBlock`s and their routers, so that every MoE family the YAMLs build is covered the same way.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT, run_cli
from ultralytics.data.augment import LetterBox
from ultralytics.utils import ASSETS, YAML

from visionmoe import VisionMoE
from visionmoe.export import DEFAULT_OPSET, default_dispatch, prepare, static_graph_problems
from visionmoe.export.formats import tensorrt_available
from visionmoe.nn import MoEBlock
from visionmoe.nn.static import StaticExportError

IMGSZ = 64
BATCH = 4  # COCO8 has 4 val images
ATOL = 1e-4
CONFIGS = {  # (E, k) both ways, both router types, mean and max router inputs, the letterbox mask, renormalised gates,
    # a shared expert, and routers that also read an earlier layer's map (router_context)
    "e4-top1": dict(experts=4, top_k=1, mask_letterbox=True),
    "e3-top2-mlp-shared": dict(experts=3, top_k=2, router="mlp", renormalize=True, shared_expert=True),
    "e4-top1-calibrated": dict(experts=4, top_k=1, router_input="max", router_context=2),
    "vit": dict(model="visionmoe-vit.yaml"),  # token-routed MoE MLPs with fixed capacity
}
DENSE_CHECKED = "e3-top2-mlp-shared"  # the dense fallback export is checked on one config, to keep the suite short
FORMS = {"gather": BATCH, "branch": 1}  # sparse export forms and the batch each is exported at; 'branch' runs the
# val images one at a time, and since row n of the val batch picks expert n, they still reach every expert
SAME_IN_EVERY_FORM = {"vit"}  # token-routed blocks have one static form, so their graph is checked once (gather)
# A fresh YOLO's activations shrink layer by layer (its norms expect unit variance), which keeps float error far
# below ATOL but also hides late experts; the calibrated variant (and the LayerNorm ViT) has realistic activations,
# where fp32 rounding grows through depth and attention to ~1e-5 of the output scale (PyTorch alone differs that much
# with BN folded or not), so there the bound is ATOL relative to the output scale.
CALIBRATED = {"e4-top1-calibrated"}
RELATIVE_ATOL = {*CALIBRATED, "vit"}
BUS = str(ASSETS / "bus.jpg")


def letterboxed(files: list[Path]) -> torch.Tensor:
    """Images as the predictor feeds them to a static export: [N, 3, IMGSZ, IMGSZ] RGB in [0, 1]."""
    lb = LetterBox(IMGSZ, auto=False)
    ims = [lb(image=cv2.imread(str(f)))[..., ::-1].transpose(2, 0, 1) for f in files]
    return torch.from_numpy(np.stack(ims).copy()).float() / 255


@torch.no_grad()
def calibrate_norms(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm statistics from `x` (one train-mode pass, dense dispatch so every expert's norms see every image)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over this one pass
    for block in model.moe_blocks():
        block.set_dispatch("dense")
    model.train()(x)
    for block in model.moe_blocks():
        block.set_dispatch("sparse")
    model.eval()


@torch.no_grad()
def force_routing(model: torch.nn.Module, x: torch.Tensor, calibration: torch.Tensor | None = None) -> None:
    """Set every router so that row n of `x` picks experts n, n+1, ... (mod E), in that order, with wide margins.

    Tracing exporters silently drop experts that the example input never reached, so the test inputs must reach
    every expert. Hidden router layers are standardised over the rows so that the last layer's solve is
    well-conditioned. With `calibration`, BatchNorm statistics are set from it first (realistic activations) and
    again before each block in forward order: forcing a router changes its block's gates, so the statistics after
    it, while nothing before it depends on it.
    """
    for block in model.moe_blocks():
        if calibration is not None:
            calibrate_norms(model, calibration)
        seen = []
        # pooled inside the forward, where the router holds its letterbox mask
        handle = block.router.register_forward_pre_hook(
            lambda m, a: seen.append(m.pool(*a) if a[0].dim() == 4 else a[0])
        )
        model(x)
        handle.remove()
        h = seen[0].flatten(0, -2).float()  # [rows, C]
        *hidden, gate = block.router.gate
        for layer in hidden:
            if isinstance(layer, torch.nn.Linear):
                z = layer(h)
                mean, std = z.mean(0), z.std(0) + 1e-12
                layer.weight.div_(std[:, None])
                layer.bias.copy_((layer.bias - mean) / std)
            h = layer(h)
        h = h.double()
        e, k = gate.out_features, block.router.top_k
        target = torch.full((len(h), e), -4.0, dtype=torch.double)
        for n in range(len(h)):
            for j in range(k):
                target[n, (n + j) % e] = 4.0 - 2.0 * j  # margins of 2 logits, far above float noise
        solution = torch.linalg.pinv(torch.cat((h, torch.ones(len(h), 1, dtype=h.dtype)), 1)) @ target
        gate.weight.copy_(solution[:-1].T)
        gate.bias.copy_(solution[-1])
    if calibration is not None:
        calibrate_norms(model, calibration)


@torch.no_grad()
def torch_reference(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Raw head output [N, 4 + nc, anchors] of the eager (sparse) model and each block's chosen experts."""
    y = model(x)[0].numpy()
    return y, {name: block.routing.indices.numpy() for name, block in model.named_moe_blocks()}


def with_router_outputs(path: Path, block_names: list[str]) -> tuple[ort.InferenceSession, dict[str, str]]:
    """Session on the exported graph with each block's router TopK indices as extra outputs, and their names."""
    model = onnx.load(str(path))
    names = []
    for block in block_names:
        scope = f"{block}.router."
        topk = [n for n in model.graph.node if n.op_type == "TopK" and n.name.replace("/", ".").lstrip(".").startswith(scope)]
        assert len(topk) == 1, f"expected one router TopK for block {block}, found {[n.name for n in topk]}"
        names.append(topk[0].output[1])
        model.graph.output.append(onnx.helper.make_tensor_value_info(names[-1], onnx.TensorProto.INT64, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, dict(zip(block_names, names))


def export_files(folder: Path) -> list[Path]:
    """Everything an export may have written in `folder` (ONNX files and scratch folders)."""
    return sorted(p for p in folder.iterdir() if p.suffix == ".onnx" or p.name.startswith(".visionmoe-export"))


def conv_nodes(path: Path) -> int:
    return sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes of `graph` and of its subgraphs (If branches), at any depth."""
    return [*graph.node, *(n for node in graph.node for a in node.attribute if a.HasField("g") for n in all_nodes(a.g))]


def convs_per_expert(vm: VisionMoE) -> list[int]:
    """Conv2d layers in one expert of each block whose experts are conv modules (none for token-routed blocks)."""
    blocks = [b for b in vm.model.moe_blocks() if isinstance(b.experts, torch.nn.ModuleList)]
    return [sum(isinstance(m, torch.nn.Conv2d) for m in b.experts[0].modules()) for b in blocks]


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def val_images(coco8) -> torch.Tensor:
    return letterboxed(sorted((coco8 / "images" / "val").glob("*.jpg"))[:BATCH])


@pytest.fixture(scope="module", params=list(CONFIGS))
def routed(request, val_images) -> tuple[VisionMoE, str]:
    """A from-YAML model whose routers send the COCO8 val images to every expert, and its config name."""
    torch.manual_seed(0)
    settings = dict(CONFIGS[request.param])
    vm = VisionMoE(settings.pop("model", "visionmoe-yolo-n.yaml"), **settings)
    vm.model.eval()
    calibration = torch.cat((val_images, torch.rand_like(val_images))) if request.param in CALIBRATED else None
    force_routing(vm.model, val_images, calibration)
    return vm, request.param


@pytest.fixture(scope="module", params=list(FORMS))
def exported(request, routed, tmp_path_factory) -> tuple[VisionMoE, Path, str, str]:
    """The routed model exported in one sparse form at that form's batch: (model, path, config name, form)."""
    vm, name = routed
    form = request.param
    if form != "gather" and name in SAME_IN_EVERY_FORM:
        pytest.skip(f"{name} exports one graph in every form, checked as 'gather'")
    folder = tmp_path_factory.mktemp(f"{name}-{form}")
    vm.model.pt_path = str(folder / "model.pt")  # the export goes next to it, as for a checkpoint
    path = Path(vm.export(format="onnx", imgsz=IMGSZ, batch=FORMS[form], moe_dispatch=form))
    assert path == folder / "model.onnx" and export_files(folder) == [path]
    assert metadata(path)["moe_dispatch"] == form
    return vm, path, name, form


def test_inputs_reach_every_expert(routed, val_images):
    vm, _ = routed
    _, chosen = torch_reference(vm.model, val_images)
    e = vm.model.moe_settings.experts
    for name, indices in chosen.items():
        assert sorted(set(indices.ravel().tolist())) == list(range(e)), f"{name} chose {indices.tolist()}"
    for name, indices in chosen.items():  # with per-image routing, the images take different routes
        if indices.ndim == 2:
            assert len({row.tobytes() for row in indices}) == min(BATCH, e), f"{name} chose {indices.tolist()}"


def test_onnx_equals_pytorch(exported, val_images):
    """Outputs and chosen experts equal the eager sparse model's, batch by batch, and the val images reach every expert
    of every block in the ONNX graph too.

    On noise images, where activations stray further, the bound adds the fp32 rounding by which PyTorch's own output
    moves once BatchNorm is folded into the convs, as every export folds it (up to ~1e-4 of the output scale on the
    calibrated config at batch 1); a wrong expert is off by the output's own scale.
    """
    vm, path, name, form = exported
    atol = ATOL * (np.abs(torch_reference(vm.model, val_images)[0]).max() if name in RELATIVE_ATOL else 1)
    session, router_outputs = with_router_outputs(path, [name for name, _ in vm.model.named_moe_blocks()])
    folded = prepare(vm.model, form).fuse(verbose=False)
    noise = torch.rand(BATCH, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))
    reached = {block: set() for block in router_outputs}
    for images in (val_images, noise):
        for x in images.split(FORMS[form]):
            ref, ref_chosen = torch_reference(vm.model, x)
            out, *indices = session.run(["output0", *router_outputs.values()], {"images": x.numpy()})
            chosen = dict(zip(router_outputs, indices))
            assert out.shape == ref.shape
            rounding = 0 if images is val_images else np.abs(torch_reference(folded, x)[0] - ref).max()
            assert np.abs(out - ref).max() <= atol + rounding
            for block in ref_chosen:
                np.testing.assert_array_equal(chosen[block], ref_chosen[block], err_msg=block)
                if images is val_images:
                    reached[block].update(chosen[block].ravel().tolist())
    experts = list(range(vm.model.moe_settings.experts))
    assert all(sorted(r) == experts for r in reached.values()), reached


def test_graph_is_static(exported):
    """Static in either form; 'branch' keeps every conv weight constant, through `If`, which only it may use."""
    vm, path, _, form = exported
    branch = form == "branch"
    assert static_graph_problems(path, opset=DEFAULT_OPSET, allow_if=branch, constant_conv_weights=branch) == []
    model = onnx.load(str(path))
    ops = {n.op_type for n in all_nodes(model.graph)}
    assert not ops & {"NonZero", "Loop", "Scan"}
    assert ("If" in ops) == (branch and bool(convs_per_expert(vm)))
    # The checks fail where they should: 'gather' computes the experts' conv weights, 'branch' needs If
    problems = static_graph_problems(path, opset=DEFAULT_OPSET, allow_if=branch, constant_conv_weights=True)
    assert len(problems) == (0 if branch else sum(convs_per_expert(vm))), problems
    assert all("has weights computed at runtime" in p for p in problems)
    if branch:
        ifs = [n for n in all_nodes(model.graph) if n.op_type == "If"]
        problems = static_graph_problems(path, opset=DEFAULT_OPSET, constant_conv_weights=True)
        assert sorted(problems) == sorted(f"If node '{n.name}' is not allowed in a static export" for n in ifs)
    for node in model.graph.node:
        if node.op_type in {"ScatterND", "ScatterElements"}:
            assert all(a.name != "reduction" or a.s == b"none" for a in node.attribute), node.name
    initializers = {t.name for t in model.graph.initializer}
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    assert topk and all(n.input[1] in initializers for n in topk)
    onnx.checker.check_model(model, full_check=True)


def test_unit_gates_leave_no_gate_arithmetic(exported):
    """Renormalized top-1 gates are exactly 1: a per-image router exports as its pooling (a mean, a max, or a mean
    over the letterbox mask's cells; and the router_context map's statistics), Gemm, Clip and TopK (the choice reads
    the logits, so no Softmax), and the block multiplies no expert output by a gate."""
    vm, path, name, _ = exported
    blocks = dict(vm.model.named_moe_blocks())
    if not all(b.routes_images and b.router.unit_gates for b in blocks.values()):
        pytest.skip(f"{name} has gates that weight its experts' outputs")
    nodes = onnx.load(str(path)).graph.node
    for block in blocks:
        scope = f"/{block}/"
        router = {n.op_type for n in nodes if n.name.startswith(f"{scope}router/")}
        own = {n.op_type for n in nodes if n.name.startswith(scope) and n.name.count("/") == 2}  # outside submodules
        settings = vm.model.moe_settings
        pooling = {"mean": {"ReduceMean"}, "max": {"ReduceMax"}}[settings.router_input]
        if settings.mask_letterbox:
            pooling = {"Mul", "ReduceSum", "Clip", "Div"}
        # the router_context map's means and standard deviations are the same for every router, so the graph pools it
        # once, in the first router; the others concatenate that result
        statistics = {"ReduceMean", "Sub", "Mul", "Add", "Sqrt", "Concat"}
        context = statistics if settings.router_context is not None else set()
        gate = {*pooling, "Gemm", "Clip", "TopK"}
        # the mask's MaxPool to a stride is exported once, in the first block at that stride
        assert gate <= router - {"MaxPool"} <= gate | context, (block, router)
        assert not own & {"Mul", "Div", "Softmax"}, (block, own)


def test_graph_runs_only_chosen_experts(exported, val_images):
    """Conv nodes: 'gather' holds one expert's convs per block, the dense fallback all E of them; 'branch' holds every
    expert's convs in If branches, one balanced tree (E - 1 If nodes, E leaves) per image and slot of each block."""
    vm, path, name, form = exported
    if not all(isinstance(b.experts, torch.nn.ModuleList) for b in vm.model.moe_blocks()):
        pytest.skip("stacked token experts run as batched matmuls over fixed-capacity buffers, not per-expert convs")
    s = vm.model.moe_settings
    all_convs = sum(isinstance(m, torch.nn.Conv2d) for m in vm.model.modules())
    per_expert = convs_per_expert(vm)
    if form == "branch":
        selections = FORMS[form] * s.top_k  # one If tree per image and slot in each block, all E experts in each
        nodes = all_nodes(onnx.load(str(path)).graph)
        assert conv_nodes(path) == all_convs - s.experts * sum(per_expert)
        assert sum(n.op_type == "Conv" for n in nodes) == conv_nodes(path) + selections * s.experts * sum(per_expert)
        assert sum(n.op_type == "If" for n in nodes) == selections * len(per_expert) * (s.experts - 1)
        return
    assert conv_nodes(path) == all_convs - (s.experts - 1) * sum(per_expert)
    if name != DENSE_CHECKED:
        return

    vm.model.pt_path = str(path.with_name("dense.pt"))
    try:
        dense = Path(vm.export(format="onnx", imgsz=IMGSZ, batch=BATCH, moe_dispatch="dense"))
    finally:
        vm.model.pt_path = str(path.with_suffix(".pt"))
    assert conv_nodes(dense) == all_convs
    assert metadata(dense)["moe_dispatch"] == "dense"
    ref, _ = torch_reference(vm.model, val_images)
    out = ort.InferenceSession(str(dense)).run(None, {"images": val_images.numpy()})[0]
    assert np.abs(out - ref).max() <= ATOL


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(format="coreml"), "format='coreml' cannot export MoE models sparsely"),
        (dict(format="torchscript", moe_dispatch="branch"), "moe_dispatch=branch is an ONNX form"),
        pytest.param(
            dict(format="engine"), "format=engine needs a CUDA GPU and the tensorrt package",
            marks=pytest.mark.skipif(tensorrt_available(), reason="TensorRT can build engines here"),
        ),
        (dict(dynamic=True), "dynamic=True cannot export MoE models"),
        (dict(nms=True), "nms=True cannot export MoE models"),
        (dict(quantize=16), "quantize=16 cannot export MoE models"),
        (dict(moe_dispatch="sparse"), "moe_dispatch='sparse' is not an export dispatch"),
    ],
)
def test_refused_settings_write_nothing(tmp_path, args, message):
    vm = VisionMoE("visionmoe-yolo-n.yaml", experts=2)
    vm.model.pt_path = str(tmp_path / "model.pt")
    with pytest.raises(StaticExportError, match=message.replace("(", r"\(")) as e:
        vm.export(imgsz=IMGSZ, **{"format": "onnx", **args})
    assert "\n" not in str(e.value)
    assert export_files(tmp_path) == []


def _unknown_expert_module(vm: VisionMoE) -> str:
    vm.model.moe_blocks()[1].experts[2].m[0].cv1.act = torch.nn.PReLU()
    return r"MoE block 'model\.8' cannot export.*expert module 'm\.0\.cv1\.act' \(PReLU\) has no static export form"


def _block_without_static_form(vm: VisionMoE) -> str:
    block = vm.model.moe_blocks()[0]
    block.__class__ = type("NoStaticMoE", (type(block),), {"static_experts_form": MoEBlock.static_experts_form})
    return r"MoE block 'model\.6' cannot export.*NoStaticMoE has no static dispatch"


@pytest.mark.parametrize("break_model", [_unknown_expert_module, _block_without_static_form])
def test_refused_models_write_nothing(tmp_path, break_model):
    vm = VisionMoE("visionmoe-yolo-n.yaml", experts=3)
    message = break_model(vm)
    vm.model.pt_path = str(tmp_path / "model.pt")
    (tmp_path / "model.onnx").write_bytes(b"an earlier export")  # a failed export must not touch it either
    with pytest.raises(StaticExportError, match=message) as e:
        vm.export(format="onnx", imgsz=IMGSZ)
    assert "\n" not in str(e.value)
    assert export_files(tmp_path) == [tmp_path / "model.onnx"]
    assert (tmp_path / "model.onnx").read_bytes() == b"an earlier export"


@pytest.fixture(scope="module")
def trained_onnx(trained_run, tmp_path_factory) -> Path:
    """best.pt of the shared tiny training, exported in the branch form through the CLI (in a copy, so other tests'
    files stay apart)."""
    folder = tmp_path_factory.mktemp("cli-export")
    pt = folder / "best.pt"
    pt.write_bytes((trained_run / "weights" / "best.pt").read_bytes())
    result = run_cli("export", f"model={pt}", "format=onnx", f"imgsz={IMGSZ}", "moe_dispatch=branch")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert export_files(folder) == [folder / "best.onnx"]
    return folder / "best.onnx"


def test_cli_export_of_trained_checkpoint(trained_onnx, val_images):
    assert static_graph_problems(trained_onnx, DEFAULT_OPSET, allow_if=True, constant_conv_weights=True) == []
    meta = metadata(trained_onnx)
    model = VisionMoE(str(trained_onnx.with_suffix(".pt"))).model.eval()
    assert meta["moe_dispatch"] == "branch" and ast.literal_eval(meta["imgsz"]) == [IMGSZ, IMGSZ]
    assert meta["batch"] == "1" and ast.literal_eval(meta["moe"])["experts"] == model.moe_settings.experts
    session = ort.InferenceSession(str(trained_onnx), providers=["CPUExecutionProvider"])
    for x in val_images.split(1):  # trained weights: BatchNorm folds into every expert conv's bias
        ref = torch_reference(model, x)[0]
        assert np.abs(session.run(None, {"images": x.numpy()})[0] - ref).max() <= ATOL * np.abs(ref).max()

    result = run_cli("export", f"model={trained_onnx.with_suffix('.pt')}", "dynamic=True")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "dynamic=True cannot export MoE models" in result.stderr


@pytest.fixture(scope="module")
def trained_formats(trained_onnx) -> dict[str, Path]:
    """The same checkpoint exported to OpenVINO (from the branch-form ONNX) and TorchScript (gather form)."""
    pt = trained_onnx.with_suffix(".pt")
    return {fmt: Path(VisionMoE(str(pt)).export(format=fmt, imgsz=IMGSZ)) for fmt in ("openvino", "torchscript")}


def test_openvino_and_torchscript_equal_pytorch(trained_onnx, trained_formats, val_images):
    import openvino as ov

    model = VisionMoE(str(trained_onnx.with_suffix(".pt"))).model.eval()
    ov_dir, ts_file = trained_formats["openvino"], trained_formats["torchscript"]
    assert ov_dir.name == "best_openvino_model" and (ov_dir / "metadata.yaml").is_file()
    xml = ov_dir / "best.xml"
    assert YAML.load(ov_dir / "metadata.yaml")["moe_dispatch"] == default_dispatch(1, "openvino") == "gather"
    assert not any(op.get_type_name() == "If" for op in ov.Core().read_model(xml).get_ops())
    # fp32 for parity: OpenVINO's CPU plugin runs bf16 by default where the processor has it (for YOLO11 alike)
    compiled = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    scripted = torch.jit.load(str(ts_file))
    # the file holds the gathered experts only, not also the training-form copies they were gathered from
    assert not [n for n, _ in scripted.named_parameters() if ".experts." in n]
    assert ts_file.stat().st_size < 1.25 * trained_onnx.stat().st_size
    for x in val_images.split(1):
        ref = torch_reference(model, x)[0]
        tol = ATOL * np.abs(ref).max()
        assert np.abs(compiled({0: x.numpy()})[0] - ref).max() <= tol
        out = scripted(x)
        assert np.abs((out[0] if isinstance(out, (list, tuple)) else out).numpy() - ref).max() <= tol


@pytest.mark.parametrize("fmt", ["openvino", "torchscript"])
def test_formats_predict_and_val(trained_formats, fmt, coco8):
    model = VisionMoE(str(trained_formats[fmt]))
    results = model.predict(BUS, imgsz=IMGSZ, save=False, verbose=False)
    assert len(results) == 1 and results[0].boxes is not None
    metrics = VisionMoE(str(trained_formats[fmt])).val(data="coco8.yaml", imgsz=IMGSZ, plots=False, verbose=False)
    assert 0.0 <= metrics.box.map50 <= 1.0


def test_autobackend_predict_and_val(trained_onnx, coco8):
    model = VisionMoE(str(trained_onnx))
    results = model.predict(BUS, imgsz=IMGSZ, save=False, verbose=False)
    assert len(results) == 1 and results[0].boxes is not None
    metrics = VisionMoE(str(trained_onnx)).val(data="coco8.yaml", imgsz=IMGSZ, plots=False, verbose=False)
    assert 0.0 <= metrics.box.map50 <= 1.0


@pytest.fixture(scope="module")
def kit_model(tmp_path_factory) -> Path:
    """Batch-1 export whose class biases are raised so that an untrained model gives detections to compare."""
    torch.manual_seed(0)
    vm = VisionMoE("visionmoe-yolo-n.yaml", experts=4)
    for head in vm.model.model[-1].cv3:
        torch.nn.init.constant_(head[-1].bias, -1.0)
    vm.model.pt_path = str(tmp_path_factory.mktemp("kit") / "model.pt")
    path = Path(vm.export(format="onnx", imgsz=IMGSZ))
    assert metadata(path)["moe_dispatch"] == default_dispatch(1)  # moe_dispatch=auto records the form it wrote
    return path


def test_deployment_kit_matches_predict(kit_model, tmp_path):
    """export/detect.py, run with torch and ultralytics made unimportable, finds what VisionMoE.predict finds."""
    out = tmp_path / "out"
    script = ROOT / "export" / "detect.py"
    blocked = (
        "import runpy, sys; sys.modules.update(torch=None, ultralytics=None, visionmoe=None); "
        f"sys.argv = [{str(script)!r}, *sys.argv[1:]]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked, str(kit_model), BUS, "--out", str(out)], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    kit = json.loads(Path(result.stdout.strip()).read_text())["detections"]
    assert (out / "bus.jpg").is_file()
    boxes = VisionMoE(str(kit_model)).predict(BUS, save=False, verbose=False)[0].boxes
    assert len(kit) == len(boxes) > 0
    assert [d["class_id"] for d in kit] == boxes.cls.int().tolist()
    np.testing.assert_allclose([d["confidence"] for d in kit], boxes.conf.numpy(), atol=1e-5)
    np.testing.assert_allclose([d["box"] for d in kit], boxes.xyxy.numpy(), atol=1.0)
