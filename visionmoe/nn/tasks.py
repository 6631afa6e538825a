"""Model YAMLs and the MoE detection model built from them.

A visionmoe YAML is an Ultralytics model YAML plus a `moe:` section, with MoE block names (e.g. MoEC3k2) in
some rows. The stock parser builds each MoE row as its dense counterpart (MoEC3k2 -> C3k2); those layers are then
replaced by MoE blocks made from the dense layers' shapes, so Ultralytics' parser is used, not copied.
"""

from __future__ import annotations

import re
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
import ultralytics.nn.tasks as ultralytics_tasks
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import LOGGER, YAML

from ..utils import packaged_dir
from ..utils.flops import active_gflops
from .blocks import MOE_BLOCKS, MoEBlock
from .routing import aux_loss
from .settings import MoESettings

MODEL_KEYS = frozenset(
    {"nc", "scales", "scale", "moe", "backbone", "head", "activation", "depth_multiple", "width_multiple",
     "channels", "yaml_file", "reg_max", "end2end", "inplace", "kpt_shape"}
)  # fmt: skip


def models_dir() -> Path:
    """Folder of the packaged model YAMLs."""
    return packaged_dir("cfg") / "models"


def find_model_yaml(cfg: str | Path) -> tuple[Path, str | None]:
    """Resolve a model name or path to (YAML file, scale); 'visionmoe-yolo-n.yaml' -> (visionmoe-yolo.yaml, 'n')."""
    path = Path(cfg)
    folders = [path.parent, models_dir()] if path.parent != Path(".") else [Path("."), models_dir()]
    for folder in folders:
        if (folder / path.name).is_file():
            return folder / path.name, None
    scaled = re.fullmatch(r"(.+)-([a-z])(\.ya?ml)", path.name)
    if scaled:
        for folder in folders:
            family = folder / f"{scaled[1]}{scaled[3]}"
            if family.is_file():
                return family, scaled[2]
    known = sorted(p.name for p in models_dir().glob("*.yaml"))
    raise FileNotFoundError(
        f"model '{cfg}' not found: pass a model YAML path or a packaged model ({', '.join(known)}, with a scale "
        f"suffix such as -n); dense Ultralytics models like yolo11n.yaml load with ultralytics.YOLO"
    )


def _check_layers(d: dict[str, Any], source: str) -> None:
    for section in ("backbone", "head"):
        if not isinstance(d.get(section), list) or not d[section]:
            raise ValueError(f"invalid model YAML {source}: '{section}' must be a non-empty list of layer rows")
    for i, row in enumerate(d["backbone"] + d["head"]):
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[2], str) and isinstance(row[3], list)):
            raise ValueError(f"invalid model YAML {source}: layer {i} must be [from, repeats, module, [args]], got {row}")
        name = row[2]
        known = (
            name in MOE_BLOCKS
            or (name.startswith("nn.") and hasattr(torch.nn, name[3:]))
            or name.startswith("torchvision.ops.")
            or isinstance(getattr(ultralytics_tasks, name, None), type)
        )
        if not known:
            raise ValueError(
                f"invalid model YAML {source}: layer {i} uses unknown module '{name}'; MoE modules are "
                f"{', '.join(MOE_BLOCKS)}, other names must be Ultralytics modules"
            )
    if not any(row[2] in MOE_BLOCKS for row in d["backbone"] + d["head"]):
        raise ValueError(
            f"model YAML {source} has no MoE layer: use one of {', '.join(MOE_BLOCKS)} in it, "
            f"or train dense models with ultralytics.YOLO"
        )


def load_model_yaml(cfg: str | Path | dict[str, Any], **moe_overrides: Any) -> dict[str, Any]:
    """Load and validate a visionmoe model YAML (or dict), apply MoE overrides, and fill in the `moe` section."""
    if isinstance(cfg, dict):
        d, source, scale = deepcopy(cfg), "dict", cfg.get("scale")
    else:
        path, scale = find_model_yaml(cfg)
        source = str(path)
        try:
            d = YAML.load(path)
        except Exception as e:
            raise ValueError(f"invalid model YAML {source}: cannot parse it ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"invalid model YAML {source}: expected a mapping with backbone and head")
        d["yaml_file"] = str(path)
    unknown = sorted(set(d) - MODEL_KEYS)
    if unknown:
        raise ValueError(f"invalid model YAML {source}: unknown keys {unknown}; valid keys are {sorted(MODEL_KEYS)}")
    _check_layers(d, source)
    if scale is not None:
        if scale not in (d.get("scales") or {}):
            raise ValueError(f"model scale '{scale}' is not in {source}; its scales are {list(d.get('scales') or [])}")
        d["scale"] = scale
    d["moe"] = MoESettings.from_dict(d.get("moe"), f"{source} moe section").replace(**moe_overrides).to_dict()
    return d


class MoEModel:
    """What every visionmoe model adds to its Ultralytics base model: settings, aux loss, active size and FLOPs.

    Mixed into BaseModel subclasses that keep their YAML dict (with a resolved `moe` section) in `self.yaml`.
    """

    yaml: dict[str, Any]

    @property
    def moe_settings(self) -> MoESettings:
        return MoESettings.from_dict(self.yaml["moe"])

    def named_moe_blocks(self) -> list[tuple[str, MoEBlock]]:
        """(module name, block) of every MoE block, in forward order."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, MoEBlock)]

    def moe_blocks(self) -> list[MoEBlock]:
        """MoE blocks in forward order."""
        return [m for _, m in self.named_moe_blocks()]

    def aux_loss(self) -> torch.Tensor:
        """Sum over MoE blocks of `alpha * balance + beta * z` for the last forward pass."""
        s = self.moe_settings
        return sum(aux_loss(m.routing, s.balance_loss, s.z_loss) for m in self.moe_blocks())

    def loss(self, batch: dict[str, Any], preds: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Detection loss plus the MoE aux loss, which appears as the 'moe' column in logs and results.csv."""
        loss, items = super().loss(batch, preds)
        aux = self.aux_loss()
        scaled = (aux * batch["img"].shape[0]).reshape(1).to(loss.dtype)  # same batch scaling as the criterion
        return torch.cat((loss, scaled)), {**items, "moe": aux.detach()}

    def active_params(self) -> int:
        """Parameters used for one image: all but the (E - k) unchosen experts of every block."""
        s = self.moe_settings
        unused = sum((s.experts - s.top_k) * m.params_per_expert() for m in self.moe_blocks())
        return sum(p.numel() for p in self.parameters()) - unused

    def info(self, detailed: bool = False, verbose: bool = True, imgsz: int | list[int] = 640):
        """Print and return (layers, total params, active params, active GFLOPs at imgsz)."""
        if not verbose:
            return None
        n_l = sum(1 for m in self.modules() if not m._modules)
        n_p = sum(p.numel() for p in self.parameters())
        n_a = self.active_params()
        gflops = active_gflops(self, imgsz, self.yaml.get("channels", 3))
        s = self.moe_settings
        scale = f"-{self.yaml['scale']}" if self.yaml.get("scale") else ""
        name = Path(self.yaml.get("yaml_file", "visionmoe")).stem + scale
        LOGGER.info(
            f"{name} summary: {n_l:,} layers, {n_p:,} parameters ({n_a:,} active), {gflops:.1f} active GFLOPs; "
            f"{len(self.moe_blocks())} MoE blocks, {s.experts} experts, top-{s.top_k}"
        )
        return n_l, n_p, n_a, gflops


class MoEDetectionModel(MoEModel, DetectionModel):
    """YOLO detection model whose MoE rows are sparse MoE blocks; adds the routers' aux losses to the loss."""

    def __init__(
        self,
        cfg: str | Path | dict[str, Any] = "visionmoe-yolo-n.yaml",
        ch: int = 3,
        nc: int | None = None,
        verbose: bool = True,
        **moe_overrides: Any,
    ):
        moe_yaml = load_model_yaml(cfg, **moe_overrides)
        rows = moe_yaml["backbone"] + moe_yaml["head"]
        blocks = {i: MOE_BLOCKS[row[2]] for i, row in enumerate(rows) if row[2] in MOE_BLOCKS}
        dense_yaml = deepcopy(moe_yaml)
        for i, row in enumerate(dense_yaml["backbone"] + dense_yaml["head"]):
            if i in blocks:
                row[2] = blocks[i].dense.__name__
        super().__init__(dense_yaml, ch=ch, nc=nc, verbose=False)
        self.yaml = {**moe_yaml, "nc": dense_yaml["nc"], "channels": dense_yaml["channels"]}
        settings = self.moe_settings
        for i, block in blocks.items():
            dense = self.model[i]
            moe = block.from_dense(dense, settings)
            moe.i, moe.f, moe.type = dense.i, dense.f, block.__name__
            moe.np = sum(p.numel() for p in moe.parameters())
            self.model[i] = moe
        if verbose:
            self.info()


def build_model(
    cfg: str | Path | dict[str, Any], ch: int = 3, nc: int | None = None, verbose: bool = True, **moe_overrides: Any
) -> MoEModel:
    """Build the model a visionmoe YAML describes (every family goes through here)."""
    return MoEDetectionModel(cfg, ch=ch, nc=nc, verbose=verbose, **moe_overrides)
