"""Model YAMLs and the MoE detection models built from them.

A YOLO-family YAML is an Ultralytics model YAML plus a `moe:` section, with MoE block names (e.g. MoEC3k2) in
some rows. The stock parser builds each MoE row as its dense counterpart (MoEC3k2 -> C3k2); those layers are then
replaced by MoE blocks made from the dense layers' shapes, so Ultralytics' parser is used, not copied.
A ViT-family YAML (one with a `vit:` section) describes a ViT detector by scale rows instead of layer rows.
"""

from __future__ import annotations

import re
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
import ultralytics.nn.tasks as ultralytics_tasks
from torch import nn
from ultralytics.nn.modules import Detect
from ultralytics.nn.tasks import BaseModel, DetectionModel
from ultralytics.utils import LOGGER, YAML
from ultralytics.utils.torch_utils import initialize_weights

from ..utils import packaged_dir
from ..utils.flops import active_gflops
from .blocks import MOE_BLOCKS, TOKEN_ROUTED, MoEBlock
from .router import SharedContext
from .routing import aux_loss, domain_loss
from .settings import DEFAULT_CAPACITY_FACTOR, MoESettings, resolve_domain_loss
from .vit import SimpleFeaturePyramid, ViT, moe_block_indices

MODEL_KEYS = frozenset(
    {"nc", "scales", "scale", "moe", "backbone", "head", "activation", "depth_multiple", "width_multiple",
     "channels", "yaml_file", "reg_max", "end2end", "inplace", "kpt_shape"}
)  # fmt: skip
VIT_MODEL_KEYS = frozenset({"nc", "scales", "scale", "moe", "vit", "yaml_file", "channels"})
VIT_DEFAULTS = {"mlp_ratio": 4.0, "moe_every": 2, "moe_last": 0.5}  # V-MoE 'Every-2' over the last half


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


def _check_vit(d: dict[str, Any], source: str) -> None:
    """Validate a ViT-family YAML and fill in the defaults of its `vit` section."""

    def fail(problem: str) -> None:
        raise ValueError(f"invalid model YAML {source}: {problem}")

    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not positive_int(d.get("nc")):
        fail(f"'nc' must be a positive integer, got {d.get('nc')!r}")
    scales = d.get("scales")
    if not isinstance(scales, dict) or not scales:
        fail("'scales' must map scale names to [depth, dim, heads, neck]")
    for name, row in scales.items():
        if not (isinstance(row, list) and len(row) == 4 and all(positive_int(v) for v in row)):
            fail(f"scale '{name}' must be [depth, dim, heads, neck] positive integers, got {row}")
        if row[1] % row[2] or row[1] % 4:
            fail(f"scale '{name}': dim {row[1]} must be divisible by heads {row[2]} and by 4 (2-D sincos positions)")
    vit = d["vit"] or {}
    if not isinstance(vit, dict):
        fail(f"'vit' must be a mapping with keys {list(VIT_DEFAULTS)}")
    unknown = sorted(set(vit) - set(VIT_DEFAULTS))
    if unknown:
        fail(f"unknown keys {unknown} in 'vit'; valid keys are {list(VIT_DEFAULTS)}")
    vit = {**VIT_DEFAULTS, **vit}
    if not (number(vit["mlp_ratio"]) and vit["mlp_ratio"] > 0):
        fail(f"vit mlp_ratio={vit['mlp_ratio']!r}, use a number > 0")
    if not positive_int(vit["moe_every"]):
        fail(f"vit moe_every={vit['moe_every']!r}, use an integer >= 1")
    if not (number(vit["moe_last"]) and 0 < vit["moe_last"] <= 1):
        fail(f"vit moe_last={vit['moe_last']!r}, use the fraction of blocks (0 < moe_last <= 1) that may hold MoE")
    d["vit"] = vit


def _fit_routing_settings(settings: MoESettings, routes_tokens: bool, routes_images: bool, source: str) -> MoESettings:
    """Token-routed models get the default capacity factors if they set none; settings of one routing kind are
    refused by a model without a layer of that kind, which would ignore them."""
    if not routes_images:
        if settings.domain_loss == "auto":
            settings = settings.replace(domain_loss=0.0)  # no per-image router to route by domain
        per_image = (
            ("dense_warmup", 0),
            ("router_input", "mean"),
            ("router_context", None),
            ("router_init", "random"),
            ("mask_letterbox", False),
            ("domain_loss", 0),
        )
        for name, default in per_image:
            if getattr(settings, name) != default:
                raise ValueError(
                    f"{name}={getattr(settings, name)!r} applies to per-image MoE blocks, but {source} routes only "
                    f"tokens; use {name}={default!r}"
                )
    if routes_tokens:
        if settings.capacity_factor is None:
            settings = settings.replace(capacity_factor=DEFAULT_CAPACITY_FACTOR)
        return settings
    ignored = [name for name in ("capacity_factor", "bpr") if getattr(settings, name) not in (None, False)]
    if ignored:
        raise ValueError(
            f"{' and '.join(ignored)} apply to token-routed MoE layers ({', '.join(sorted(TOKEN_ROUTED))} or ViT "
            f"models), but {source} routes per image and would ignore them; remove them"
        )
    return settings


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
    vit = "vit" in d
    valid = VIT_MODEL_KEYS if vit else MODEL_KEYS
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(f"invalid model YAML {source}: unknown keys {unknown}; valid keys are {sorted(valid)}")
    if vit:
        _check_vit(d, source)
    else:
        _check_layers(d, source)
    if scale is not None:
        if scale not in (d.get("scales") or {}):
            raise ValueError(f"model scale '{scale}' is not in {source}; its scales are {list(d.get('scales') or [])}")
        d["scale"] = scale
    settings = MoESettings.from_dict(d.get("moe"), f"{source} moe section").replace(**moe_overrides)
    moe_rows = [] if vit else [row[2] for row in d["backbone"] + d["head"] if row[2] in MOE_BLOCKS]
    routes_tokens = vit or any(name in TOKEN_ROUTED for name in moe_rows)
    routes_images = any(name not in TOKEN_ROUTED for name in moe_rows)
    d["moe"] = _fit_routing_settings(settings, routes_tokens, routes_images, source).to_dict()
    return d


LETTERBOX_FILL = 114  # the grey Ultralytics pads letterboxes, mosaics and scale augmentation with


def letterbox_content(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] images in [0, 1] -> [B, 1, H, W] float mask, 1 where a pixel is not exactly the letterbox grey."""
    fill = torch.full((), LETTERBOX_FILL, dtype=images.dtype, device=images.device) / 255  # as preprocessing divides
    return (images != fill).any(1, keepdim=True).to(images.dtype)


class MoEModel:
    """What every visionmoe model adds to its Ultralytics base model: settings, aux loss, active size and FLOPs.

    Mixed into BaseModel subclasses that keep their YAML dict (with a resolved `moe` section) in `self.yaml`.
    """

    yaml: dict[str, Any]

    @property
    def moe_settings(self) -> MoESettings:
        return MoESettings.from_dict(self.yaml["moe"])

    def named_moe_blocks(self) -> list[tuple[str, MoEBlock]]:
        """(module name, block) of every MoE block, in forward order.

        Found once and kept: the training step asks several times per batch, and walking every module took ~0.8 ms
        each time on CPU. Blocks are modified in place (tie, split, set_dispatch), never replaced, after the model's
        constructor, which is the one place that swaps layers and calls `_forget_moe_blocks`.
        """
        if "_named_moe_blocks" not in self.__dict__:
            self._named_moe_blocks = [(name, m) for name, m in self.named_modules() if isinstance(m, MoEBlock)]
        return list(self._named_moe_blocks)

    def _forget_moe_blocks(self) -> None:
        self.__dict__.pop("_named_moe_blocks", None)

    def moe_blocks(self) -> list[MoEBlock]:
        """MoE blocks in forward order."""
        return [m for _, m in self.named_moe_blocks()]

    def _predict_once(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward. Per-image routers first get the input's content mask (with `mask_letterbox`)
        and one `SharedContext` (with `router_context`), so that the context map is pooled once for all of them."""
        masked = self.yaml["moe"].get("mask_letterbox", False)  # the validated settings dict: no rebuild per forward
        routers = [b.router for b in self.moe_blocks() if b.routes_images]
        content = letterbox_content(x) if masked and routers else None
        shared = SharedContext() if any(router.context_channels for router in routers) else None
        for router in routers:
            router.content, router.shared_context = content, shared
        try:
            return super()._predict_once(x, *args, **kwargs)
        finally:
            for router in routers:
                router.content = router.shared_context = None  # never kept in checkpoints or reused for another input

    def fuse(self, verbose: bool = True, imgsz: int | list[int] = 640):
        """Ultralytics' Conv+BN fusion, after residual experts are folded into independent ones
        (`MoEBlock.fold_residual`): fusing a base and a delta each with its own norm would not fuse their sum."""
        for block in self.moe_blocks():
            block.fold_residual()
        return super().fuse(verbose, imgsz)

    def aux_loss(self, domain_experts: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over the MoE blocks that routed in the last forward pass of `alpha * balance + beta * z + gamma * mi`,
        plus `domain_loss` times each per-image router's cross-entropy with `domain_experts` [B] when given."""
        s = self.moe_settings
        blocks = [m for m in self.moe_blocks() if m.routing is not None]
        losses = [aux_loss(m.routing, s.balance_loss, s.z_loss, s.mi_loss) for m in blocks]
        weight = resolve_domain_loss(s, tagged=True).domain_loss if domain_experts is not None else 0
        if weight:
            losses += [weight * domain_loss(m.routing.logits, domain_experts) for m in blocks if m.routes_images]
        return sum(losses) if losses else next(self.parameters()).new_zeros(())  # all blocks tied: no router ran

    def loss(self, batch: dict[str, Any], preds: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Detection loss plus the MoE aux loss, which appears as the 'moe' column in logs and results.csv.

        A batch with 'domain_expert' [B] (the trainer adds it under `domain_loss`) sends each tagged image to its
        domain's expert in every per-image block during this forward, and the routers learn to predict that expert,
        also while the experts are tied in a dense warmup (one expert computes; the routers train from the start).
        """
        experts = batch.get("domain_expert") if self.training else None
        blocks = [m for m in self.moe_blocks() if m.routes_images] if experts is not None and preds is None else []
        for block in blocks:
            block.assigned = experts
        try:
            loss, items = super().loss(batch, preds)
        finally:
            for block in blocks:
                block.assigned = None  # never kept for another forward
        aux = self.aux_loss(experts)
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
        context = settings.router_context
        context_channels = 0 if context is None else self._context_channels(context, blocks, ch)
        for i, block in blocks.items():
            dense = self.model[i]
            reads_context = context is not None and getattr(block, "routes_images", False)
            moe = block.from_dense(dense, settings, **({"context_channels": context_channels} if reads_context else {}))
            moe.i, moe.f, moe.type = dense.i, [dense.f, context] if reads_context else dense.f, block.__name__
            moe.np = sum(p.numel() for p in moe.parameters())
            self.model[i] = moe
        self._forget_moe_blocks()  # a forward above (the context's channels) may have listed the dense layers
        if context is not None:
            self.save = sorted({*self.save, context})  # the forward keeps the context map for the blocks that read it
        if verbose:
            self.info()

    def _context_channels(self, index: int, blocks: dict[int, type[nn.Module]], ch: int) -> int:
        """Channels of the `router_context` layer's output map, from one small eval forward of the dense model."""
        first = min(i for i, block in blocks.items() if getattr(block, "routes_images", False))
        if index >= first:
            raise ValueError(
                f"invalid MoE setting: router_context={index} must name a layer before the first per-image MoE "
                f"block (layer {first}), whose routers read it"
            )
        seen: list[Any] = []
        hook = self.model[index].register_forward_hook(lambda module, inputs, output: seen.append(output))
        was_training = self.training
        try:
            with torch.no_grad():
                self.eval()._predict_once(torch.zeros(1, ch, 2 * int(self.stride.max()), 2 * int(self.stride.max())))
        finally:
            hook.remove()
            self.train(was_training)
        if not (isinstance(seen[0], torch.Tensor) and seen[0].dim() == 4):
            raise ValueError(f"invalid MoE setting: router_context={index} names a layer without a feature map output")
        return seen[0].shape[1]


class MoEViTDetectionModel(MoEModel, DetectionModel):
    """ViT detector whose MLPs in the YAML's chosen blocks are token-routed MoE layers (V-MoE), with a YOLO Detect head.

    `self.model` is [ViT, SimpleFeaturePyramid, Detect], each layer carrying the `.i`/`.f` that DetectionModel's
    forward reads, so Ultralytics' loss, trainer, validator and predictor run unchanged.
    """

    def __init__(
        self,
        cfg: str | Path | dict[str, Any] = "visionmoe-vit-s.yaml",
        ch: int = 3,
        nc: int | None = None,
        verbose: bool = True,
        **moe_overrides: Any,
    ):
        BaseModel.__init__(self)  # not DetectionModel.__init__: it parses backbone/head rows, which a ViT YAML lacks
        self.yaml = load_model_yaml(cfg, **moe_overrides)
        if "scale" not in self.yaml:
            self.yaml["scale"] = next(iter(self.yaml["scales"]))
            LOGGER.warning(f"no model scale passed. Assuming scale='{self.yaml['scale']}'.")
        if nc and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        self.yaml["channels"] = ch
        depth, dim, heads, neck = self.yaml["scales"][self.yaml["scale"]]
        vit = self.yaml["vit"]
        moe_blocks = moe_block_indices(depth, vit["moe_every"], vit["moe_last"])
        backbone = ViT(ch, dim, depth, heads, vit["mlp_ratio"], moe_blocks, self.moe_settings)
        pyramid = SimpleFeaturePyramid(dim, neck)
        head = Detect(self.yaml["nc"], ch=(neck,) * len(pyramid.strides))
        self.model = nn.Sequential(backbone, pyramid, head)
        for i, m in enumerate(self.model):
            m.i, m.f, m.type, m.np = i, -1, type(m).__name__, sum(p.numel() for p in m.parameters())
        self.save = []
        self.names = {i: f"{i}" for i in range(self.yaml["nc"])}
        self.inplace = head.inplace = True
        self.stride = head.stride = torch.tensor(pyramid.strides, dtype=torch.float32)
        head.bias_init()
        initialize_weights(self)
        if verbose:
            self.info()


def build_model(
    cfg: str | Path | dict[str, Any], ch: int = 3, nc: int | None = None, verbose: bool = True, **moe_overrides: Any
) -> MoEModel:
    """Build the model a visionmoe YAML describes (every family goes through here); a `vit:` section picks the ViT."""
    d = load_model_yaml(cfg, **moe_overrides)
    family = MoEViTDetectionModel if "vit" in d else MoEDetectionModel
    model = family(d, ch=ch, nc=nc, verbose=verbose)
    for name, block in model.named_moe_blocks():
        block.router.label = name
    return model
