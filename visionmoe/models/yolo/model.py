"""VisionMoE: the Ultralytics-style model object for MoE detectors (train, val, predict, export, info)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from torch import nn
from ultralytics.cfg import DEFAULT_CFG_DICT, get_cfg
from ultralytics.data.utils import check_det_dataset
from ultralytics.engine.model import Model
from ultralytics.models.yolo.detect import DetectionPredictor, DetectionValidator
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils import RANK
from ultralytics.utils.torch_utils import select_device

from ...analysis import analyze
from ...data import find_data_yaml
from ...nn.capacity import Calibration
from ...nn.routing import TARGET_DROP
from ...nn.settings import check_keys
from ...nn.tasks import MoEModel, build_model, load_model_yaml
from ...nn.upcycle import upcycle
from ...utils import is_image_file, readable_image
from .calibrate import calibrate_split
from .train import MoEDetectionTrainer

DEFAULT_MODEL = "visionmoe-yolo-n.yaml"


def check_image_files(source: Any) -> None:
    """Raise a one-line error for an image file (or list of them) that OpenCV cannot decode."""
    for item in source if isinstance(source, (list, tuple)) else [source]:
        if isinstance(item, (str, Path)) and is_image_file(item) and Path(item).is_file():
            if not readable_image(item):
                raise ValueError(f"cannot read image '{item}': it is corrupt or not an image; pass a readable image file")


def traced_batch(path: str | Path) -> int:
    """Batch of a TorchScript export, from the Ultralytics metadata it carries (extra file config.txt): the static
    MoE forms fold the batch into their grouped convs, so a trace runs only at that batch."""
    with zipfile.ZipFile(path) as archive:
        config = next((n for n in archive.namelist() if n.endswith("extra/config.txt")), None)
        return int(json.loads(archive.read(config)).get("batch", 1)) if config else 1


class VisionMoE(Model):
    """Sparse Mixture-of-Experts detector with the Ultralytics model API.

    Examples:
        >>> model = VisionMoE("visionmoe-yolo-n.yaml", experts=8, top_k=1)
        >>> model.train(data="coco8.yaml", epochs=3)
        >>> results = model.predict("bus.jpg")
    """

    def __init__(self, model: str | Path = DEFAULT_MODEL, task: str | None = None, verbose: bool = False, **moe: Any):
        """Build from a model YAML (MoE settings may override its `moe:` section) or load a checkpoint."""
        check_keys(moe, "MoE settings")  # unknown keys fail here; values are checked against the model YAML's
        if moe and not str(model).lower().endswith((".yaml", ".yml")):
            raise ValueError(
                f"MoE settings {sorted(moe)} apply when building from a model YAML; '{model}' already fixes them"
            )
        self.moe_overrides = moe  # read by _new() and train(), which Model.__init__ and users call
        super().__init__(model=model, task=task, verbose=verbose)

    def _new(self, cfg: str, task: str | None = None, verbose: bool = False) -> None:
        """Build a new model from a visionmoe YAML (Ultralytics' loader does not know MoE YAMLs or their scales)."""
        cfg_dict = load_model_yaml(cfg, **self.moe_overrides)
        self.cfg = cfg
        self.task = task or "detect"
        self.model = build_model(cfg_dict, verbose=verbose and RANK == -1)
        self.overrides["model"] = self.cfg
        self.overrides["task"] = self.task
        self.model.args = {**DEFAULT_CFG_DICT, **self.overrides}  # lets export and predict run on a YAML model
        self.model.task = self.task
        self.model_name = cfg

    def predict(self, source: Any = None, stream: bool = False, predictor=None, **kwargs: Any):
        """Ultralytics predict, but an unreadable image file fails loudly instead of being skipped with a warning."""
        check_image_files(source)
        return super().predict(source, stream=stream, predictor=predictor, **kwargs)

    def val(self, validator=None, **kwargs: Any):
        """Ultralytics val; packaged dataset names (synth-shapes.yaml) resolve like in train, and a TorchScript
        export runs at the batch it was traced at (Ultralytics assumes TorchScript batches freely)."""
        if kwargs.get("data"):
            kwargs["data"] = find_data_yaml(kwargs["data"])
        if str(self.model).endswith(".torchscript"):
            kwargs.setdefault("batch", traced_batch(self.model))
        return super().val(validator=validator, **kwargs)

    def train(self, trainer=None, **kwargs: Any):
        """Train with MoEDetectionTrainer; MoE settings given at construction reach the trainer's model build."""
        return super().train(trainer=trainer, **{**self.moe_overrides, **kwargs})

    def load(self, weights: str | Path | nn.Module = "yolo11n.pt") -> VisionMoE:
        """Load MoE weights, or upcycle from a dense YOLO11 checkpoint of the same family (shared layers copied,
        experts copied from the dense blocks they replace, routers fresh); the upcycle report is in `upcycled`."""
        self._check_is_pytorch_model()
        dense, _ = load_checkpoint(weights) if isinstance(weights, (str, Path)) else (weights, None)
        if isinstance(dense, MoEModel):
            return super().load(weights)
        self.upcycled = upcycle(self.model, dense, source=str(weights) if isinstance(weights, (str, Path)) else None)
        self.ckpt, self.ckpt_path = {"model": self.model}, None  # train() then starts from the upcycled weights
        self.predictor = None
        return self

    def export(self, **kwargs: Any) -> str:
        """Export to ONNX with static top-k that keeps the sparsity (moe_dispatch=dense runs every expert instead).

        Takes Ultralytics' export arguments (format=onnx, imgsz, batch, opset=17, ...) plus `moe_dispatch`;
        settings that cannot give a static graph (dynamic=True, nms=True, other formats, ...) are refused.
        """
        from ...export import MoEExporter  # onnx tooling loads only when exporting

        self._check_is_pytorch_model()
        custom = {"imgsz": self.model.args["imgsz"], "batch": 1, "data": None, "device": None, "verbose": False}
        args = {**self.overrides, **custom, **kwargs, "mode": "export"}  # Model.export's defaults and priorities
        return MoEExporter(overrides=args, _callbacks=self.callbacks)(model=self.model)

    def analyze(self, data: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Routing analysis on the dataset's val split (or `split=`): expert utilisation, entropy, dead/dominant
        experts, drop rate, routing matrices and NMI by class, object size and domain, and routing maps.

        Takes Ultralytics' val arguments (imgsz, batch, device, split, project, name, ...); `data` defaults to the
        checkpoint's training data. Writes analysis.json, analysis.md and PNGs to runs/detect/analyze (or
        project/name) and returns the analysis.json contents.
        """
        self._check_is_pytorch_model()
        args = {**self.overrides, "rect": True, "plots": False, **kwargs}  # plots: Ultralytics' own val figures
        args["data"] = data or args.get("data")
        if not args["data"]:
            raise ValueError("analyze needs a dataset: pass data=path/to/data.yaml")
        args["data"] = find_data_yaml(args["data"])
        return analyze(self.model, args, self.callbacks)

    def calibrate(self, data: str | None = None, target_drop: float = TARGET_DROP, **kwargs: Any) -> Calibration:
        """Fit the eval capacity factors of every token-routed layer to the routing measured on a dataset split: one
        per expert (multiples of 0.05), the fewest slots in all that drop at most `target_drop` of the layer's
        assignments, never more than the configured factor gives. An export made afterwards computes the
        correspondingly smaller expert buffers.

        Takes Ultralytics' val arguments (imgsz, batch, device, split, workers); `data` defaults to the checkpoint's
        training data. Each image counts twice: letterboxed square, as a static export at imgsz sees it, and in
        Ultralytics' padded val batches, so that `val` and the export both keep to the target. The factors belong to
        the model: `save()` or `export()` it afterwards. Returns each layer's factors and drop rates.
        """
        self._check_is_pytorch_model()
        args = get_cfg(overrides={**self.overrides, **kwargs, "mode": "val"})
        args.data = data or args.data
        if not args.data:
            raise ValueError("calibrate needs a dataset: pass data=path/to/data.yaml")
        device = select_device(args.device, verbose=False)
        self.model.float().to(device)
        return calibrate_split(self.model, args, check_det_dataset(find_data_yaml(args.data)), device, target_drop)

    @property
    def task_map(self) -> dict[str, dict[str, Any]]:
        return {
            "detect": {
                "model": build_model,
                "trainer": MoEDetectionTrainer,
                "validator": DetectionValidator,
                "predictor": DetectionPredictor,
            }
        }
