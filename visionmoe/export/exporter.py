"""ONNX export of MoE models with static top-k that keeps the sparsity.

The model is copied, every MoE block switched to a static dispatch in which only the chosen experts compute, and
the copy handed to Ultralytics' Exporter, which fuses, traces and writes its usual metadata; visionmoe adds its MoE
settings and the form written to that metadata. Two sparse forms: 'branch' selects each chosen expert's own
constant-weight subgraph through ONNX `If` (the tracer writes placeholders that export/branches.py expands), and
'gather' runs the chosen experts' gathered weights as one grouped conv, branch-free. `default_dispatch` picks one
for the export batch. The legacy tracer records every `x.shape` as runtime Shape ops, so the graph is then
constant-folded (onnxscript's optimizer, as torch.onnx uses it) with its constants lifted to initializers, checked
to be static (see checks.py), and only then moved to its final path, so a failed export leaves no file behind.
A dense export (every expert runs, unchosen ones weighted 0) happens only when asked for with moe_dispatch=dense.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.cfg import DEFAULT_CFG
from ultralytics.engine.exporter import Exporter
from ultralytics.utils import LOGGER, colorstr

from ..nn.static import BranchExperts, GatheredExperts, StaticExportError
from ..nn.tasks import MoEModel
from .branches import expand_switches, sink_initializers
from .checks import check_static_graph
from .formats import onnx_to_openvino, tensorrt_available

EXPORT_DISPATCHES = ("auto", "branch", "gather", "dense")  # values of moe_dispatch; 'auto' is `default_dispatch`
EXPORT_FORMATS = ("onnx", "openvino", "torchscript", "engine")  # all built from the static sparse form
EXPORT_KEYS = ("moe_dispatch",)  # visionmoe-only export arguments, popped before Ultralytics checks the rest
DEFAULT_OPSET = 17  # TensorRT-friendly and supported by every current ONNX Runtime


def default_dispatch(batch: int, fmt: str = "onnx") -> str:
    """The faster sparse form for an export batch and format, as measured by benchmarks/export_latency.py.

    ONNX Runtime (and TensorRT, built from the same ONNX) at batch 1: `If` over constant-weight experts (1.00-1.02x
    YOLO11n at 640 px against 1.04-1.06x for gathered weights). At batch > 1 the branch form would run one `If` tree
    per image and slot, each with its own copy of the weights. OpenVINO's CPU plugin runs `If` slowly (1.25-1.36x
    against 1.08-1.12x), and TorchScript is traced tensor code that holds no `If`: both take the gathered form.
    """
    return "branch" if batch == 1 and fmt in {"onnx", "engine"} else "gather"


def preflight_args(args: Any, dispatch: str) -> None:
    """Refuse, in one line, export settings that cannot give a static MoE graph."""
    if dispatch not in EXPORT_DISPATCHES:
        raise StaticExportError(f"moe_dispatch='{dispatch}' is not an export dispatch, use one of {list(EXPORT_DISPATCHES)}")
    if args.format not in EXPORT_FORMATS:
        raise StaticExportError(
            f"format='{args.format}' cannot export MoE models sparsely: use one of {', '.join(EXPORT_FORMATS)}"
        )
    if args.format == "engine" and not tensorrt_available():
        raise StaticExportError(
            "format=engine needs a CUDA GPU and the tensorrt package: build the engine on the target device, or "
            "export format=onnx and build it there (see export/README.md)"
        )
    if args.format == "torchscript" and dispatch == "branch":
        raise StaticExportError("moe_dispatch=branch is an ONNX form: TorchScript exports moe_dispatch=gather (or auto)")
    if args.dynamic:
        raise StaticExportError("dynamic=True cannot export MoE models: the graph is static, fix 'batch' and 'imgsz' instead")
    if args.nms:
        raise StaticExportError("nms=True cannot export MoE models: embedded NMS has data-dependent shapes, run NMS after the graph")
    if args.quantize not in {None, 32, "32", "fp32"}:
        raise StaticExportError(
            f"quantize={args.quantize} cannot export MoE models: low-precision routers collapse routing; export FP32 "
            f"and reduce precision in the runtime with the router kept in FP32 (see export/README.md)"
        )


def prepare(model: MoEModel, dispatch: str) -> MoEModel:
    """Copy of `model` in eval mode with every MoE block switched to `dispatch`; raises if a block cannot switch."""
    if not isinstance(model, MoEModel):
        raise StaticExportError(f"{type(model).__name__} is not a visionmoe model; export dense models with ultralytics.YOLO")
    model = deepcopy(model).eval()
    for name, block in model.named_moe_blocks():
        try:
            block.set_dispatch(dispatch)
        except StaticExportError as e:
            raise StaticExportError(f"MoE block '{name}' cannot export with moe_dispatch={dispatch}: {e}") from None
        if isinstance(block.static_experts, BranchExperts):
            block.static_experts.name = name  # the traced placeholders carry it, so that their experts can be found
    return model


def export_path(model: MoEModel) -> Path:
    """Where Ultralytics' Exporter would write the ONNX file of `model` (next to its .pt, or in cwd for a YAML)."""
    file = Path(getattr(model, "pt_path", None) or getattr(model, "yaml_file", None) or model.yaml.get("yaml_file", ""))
    return Path(file.name if file.suffix in {".yaml", ".yml"} else file).with_suffix(".onnx")


def fold_shapes(path: str | Path) -> None:
    """Fold the traced graph's shape computations into constants, in place; static input shapes make them constant.

    Constants become initializers too, so that TopK's K reads as a constant in shape inference and in TensorRT, each
    in the graph that uses it (see `sink_initializers`).
    """
    import onnx_ir as ir  # onnxscript and onnx-ir load only when exporting
    import onnxscript.optimizer
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    model = ir.load(path)
    onnxscript.optimizer.optimize(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    sink_initializers(model)
    ir.save(model, path)


class MoEExporter(Exporter):
    """Ultralytics Exporter for visionmoe models: static sparse (or, on request, dense) ONNX with MoE metadata.

    Accepts the Ultralytics export arguments plus `moe_dispatch` ('auto' by default: `default_dispatch` of the
    batch; or 'branch', 'gather', 'dense'), which becomes the form written; `opset` defaults to 17.
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict[str, Any] | None = None, _callbacks: dict | None = None):
        overrides = dict(overrides or {})
        self.moe_dispatch = overrides.pop("moe_dispatch", None) or "auto"
        # The ONNX graph is folded by onnxscript (fold_shapes); onnxslim, an optional extra, runs only when asked for
        # (Ultralytics refuses the key for formats without ONNX, so it is set only where it applies)
        if str(overrides.get("format", "onnx")).lower() in {"onnx", "engine"}:
            overrides.setdefault("simplify", False)
        super().__init__(cfg, overrides, _callbacks)

    def __call__(self, model: MoEModel) -> str:
        """Export `model` and return the path written; nothing is written if any step fails."""
        self.args.format = str(self.args.format).lower()
        preflight_args(self.args, self.moe_dispatch)
        if self.moe_dispatch == "auto":
            self.moe_dispatch = default_dispatch(self.args.batch, self.args.format)
        target = export_path(model)
        prepared = prepare(model, self.moe_dispatch)
        # Write into a scratch folder beside the target and move the result into place only once it passed the checks
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".visionmoe-export-", dir=target.parent))
        try:
            prepared.pt_path = str(scratch / target.with_suffix(".pt").name)
            f = Path(super().__call__(prepared))
            final = target.with_name(f.name)
            if final.is_dir():  # an OpenVINO folder from an earlier export
                shutil.rmtree(final)
            os.replace(f, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        LOGGER.info(f"{colorstr('visionmoe:')} {self.moe_dispatch} MoE {self.args.format} export saved to {final.resolve()}")
        return str(final)

    def add_moe_metadata(self) -> None:
        """The MoE settings and the form written, beside Ultralytics' metadata (names, stride, imgsz, ...)."""
        self.metadata["moe"] = self.model.moe_settings.to_dict()
        self.metadata["moe_dispatch"] = self.moe_dispatch

    def export_onnx(self, prefix=colorstr("ONNX:")):  # noqa: B008
        """Ultralytics' ONNX export, then the branch form's `If` trees, shape folding and the static checks.

        Every other format (OpenVINO, TensorRT) is built from this checked file.
        """
        self.add_moe_metadata()
        # Set here, not in __init__: Ultralytics refuses an opset argument for formats other than ONNX and TensorRT,
        # which are built from this ONNX all the same.
        self.args.opset = self.args.opset or DEFAULT_OPSET
        with torch.no_grad():
            f = super().export_onnx(prefix)
        branch = self.moe_dispatch == "branch"
        if branch:
            experts = {m.name: m.experts for m in self.model.modules() if isinstance(m, BranchExperts)}
            expand_switches(f, experts, self.args.opset)
        fold_shapes(f)
        check_static_graph(f, self.args.opset, allow_if=branch, constant_conv_weights=self.moe_dispatch != "gather")
        return f

    def export_openvino(self, prefix=colorstr("OpenVINO:")):  # noqa: B008
        """OpenVINO IR converted from the checked static ONNX (see formats.py)."""
        f = onnx_to_openvino(self.export_onnx(), self.metadata)
        LOGGER.info(f"{prefix} converted the static ONNX graph to '{f}'")
        return f

    def export_torchscript(self, prefix=colorstr("TorchScript:")):  # noqa: B008
        """Ultralytics' TorchScript export of the gathered form, with the MoE metadata.

        A traced module keeps every submodule's weights, used or not, so the training-form experts, which the gathered
        form copied, are dropped from the (already copied) export model first.
        """
        self.add_moe_metadata()
        for block in self.model.moe_blocks():
            if isinstance(block.static_experts, GatheredExperts):
                block.experts = nn.ModuleList()
        with torch.no_grad():
            return super().export_torchscript(prefix)
