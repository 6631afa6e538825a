"""Trainer for MoE detection models: builds MoEDetectionModel, logs the aux loss and expert utilisation."""

from __future__ import annotations

import os
from copy import copy
from pathlib import Path
from typing import Any

import torch
from ultralytics.cfg import DEFAULT_CFG
from ultralytics.data import build_dataloader, build_yolo_dataset
from ultralytics.data.utils import check_det_dataset
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from ...analysis.domains import domain_experts, load_domains
from ...analysis.report import run_info, write_analysis
from ...analysis.utilisation import UtilisationTracker
from ...analysis.validator import RoutingValidator
from ...data import find_data_yaml
from ...nn.capacity import reset_capacity, token_routed_layers
from ...nn.router_init import nearest_centroid_gate
from ...nn.settings import MoESettings, check_keys, pop_moe_overrides, resolve_domain_loss
from ...nn.tasks import MoEModel, build_model, load_model_yaml
from ...nn.upcycle import upcycle
from ...utils import is_image_file, partial_path, readable_image, replaced_atomically, use_allowed_cpus
from .calibrate import calibrate_checkpoint

UTILISATION_CSV = "expert_utilisation.csv"
CLIP_NORM = 10.0  # BaseTrainer.optimizer_step's max_norm


class MoEDetectionTrainer(DetectionTrainer):
    """DetectionTrainer for MoE models.

    Accepts MoE settings (experts=8, top_k=2, ...) beside the Ultralytics arguments; they apply when the model is
    built from a YAML. The 'moe' loss column comes from MoEDetectionModel.loss; per-epoch expert shares go to
    `expert_utilisation.csv` in the run folder. With `dense_warmup`, per-image MoE blocks train tied (one expert,
    router idle) for that fraction of the epochs and then split into E copies (see `_split_after_dense_warmup`).
    The optimizer steps with fused or foreach kernels, the routers' gradients clipped apart from the detector's.
    Validation records routing. At the end of training, best.pt's eval capacity is calibrated on the val split
    (token-routed models), and the final validation's utilisation and NMI summary goes to analysis.json and
    analysis.md in the run folder.
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict[str, Any] | None = None, _callbacks=None):
        overrides = dict(overrides or {})
        self.moe_overrides = pop_moe_overrides(overrides)
        self.domain_expert_of: dict[str, int] | None = None  # image stem -> expert, under domain_loss (get_model)
        model, settings = overrides.get("model"), None
        if isinstance(model, (str, Path)) and str(model).endswith((".yaml", ".yml")):
            # impossible settings fail before any run folder exists
            settings = MoESettings.from_dict(load_model_yaml(model, **self.moe_overrides)["moe"])
        else:
            check_keys(self.moe_overrides, "MoE settings")
        if isinstance(overrides.get("data"), str) and not overrides.get("resume"):
            overrides["data"] = str(find_data_yaml(overrides["data"]))  # packaged names, e.g. synth-shapes.yaml
            data = check_det_dataset(overrides["data"])
            check_usable_images(data)  # fail before any run folder exists
            if settings is not None:
                domain_routing(settings, data)
        super().__init__(cfg, overrides, _callbacks)
        if self.moe_overrides and isinstance(self.model, (str, Path)) and not self.resume:
            # Build now: DDP workers receive this module, while a YAML path would be rebuilt without the overrides.
            self.model = self.get_model(cfg=self.model, verbose=RANK == -1)
        use_allowed_cpus(self.device)
        self.utilisation = UtilisationTracker()
        self.add_callback("on_pretrain_routine_end", _seed_router_noise)
        self.add_callback("on_train_start", _tie_for_dense_warmup)
        self.add_callback("on_train_epoch_start", _split_after_dense_warmup)
        self.add_callback("on_train_batch_end", _track_utilisation)
        self.add_callback("on_train_epoch_end", _write_utilisation)
        self.add_callback("on_train_end", _write_routing_summary)

    def build_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """Ultralytics' optimizer, stepping every parameter group with torch's fused or multi-tensor kernels.

        Off CUDA torch defaults to a Python loop over tensors, so the step grows with the tensor count, and an MoE
        model holds E copies of every expert tensor; see `use_fast_kernels`.
        """
        return use_fast_kernels(super().build_optimizer(*args, **kwargs))

    def optimizer_step(self) -> None:
        """Ultralytics' step (unscale, clip the gradient norm at 10, step, EMA update), with the routers' gradients
        clipped apart from the detector's.

        Ultralytics clips the norm of all gradients together, so the routers' own losses would scale every step of
        the detector; clipped apart, the detector steps as it would without routers, and a tied MoE trains
        exactly as the dense YOLO built from the same seed until its experts split (`split_epoch`).
        """
        self.scaler.unscale_(self.optimizer)
        routers = {id(p) for block in unwrap_model(self.model).moe_blocks() for p in block.router.parameters()}
        params = list(self.model.parameters())
        for group in ([p for p in params if id(p) not in routers], [p for p in params if id(p) in routers]):
            torch.nn.utils.clip_grad_norm_(group, max_norm=CLIP_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)

    def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ultralytics' preprocessing; under `domain_loss` the batch also gets 'domain_expert' [B], the expert of each
        image's domain (-1 for untagged images), which MoEModel.loss routes and supervises with."""
        batch = super().preprocess_batch(batch)
        if self.domain_expert_of is not None:
            experts = [self.domain_expert_of.get(Path(f).stem, -1) for f in batch["im_file"]]
            batch["domain_expert"] = torch.tensor(experts, device=batch["img"].device)
        return batch

    def get_validator(self) -> RoutingValidator:
        """DetectionValidator that also records routing; no example images, since training writes no routing maps."""
        return RoutingValidator(
            self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks, examples=0
        )

    def save_model(self) -> bool:
        """Ultralytics' checkpoint save, made atomic: files are written under temporary names and renamed over the
        old ones, so an interrupt (Ctrl-C, SIGKILL, pre-emption) mid-write never leaves a truncated last.pt/best.pt."""
        # EMA averages float tensors only; integer state (router noise steps) must match the live model, since
        # checkpoints and resumes are built from the EMA.
        ema_buffers = dict(self.ema.ema.named_buffers())
        for name, buffer in unwrap_model(self.model).named_buffers():
            if not buffer.is_floating_point():
                ema_buffers[name].copy_(buffer)
        final = (self.last, self.best)
        self.last, self.best = (partial_path(path) for path in final)
        try:
            saved = super().save_model()
        finally:
            partial, (self.last, self.best) = (self.last, self.best), final
        for tmp, path in zip(partial, final):
            if tmp.exists():
                os.replace(tmp, path)  # atomic on POSIX and Windows
        return saved

    def resume_training(self, ckpt: dict[str, Any] | None) -> None:
        """Ultralytics' resume, then drop the per-epoch log rows the checkpoint does not hold.

        Ultralytics appends an epoch's results.csv row before it saves last.pt, so a kill between the two leaves a
        row for an epoch that resume trains again; without this it would be logged twice.
        """
        super().resume_training(ckpt)
        if ckpt is not None and self.resume and RANK in {-1, 0}:
            for path in (self.csv, self.save_dir / UTILISATION_CSV):
                drop_epochs_after(path, self.start_epoch)  # rows count epochs from 1: start_epoch is the last kept

    def final_eval(self) -> None:
        """Calibrate the eval capacity of best.pt's token-routed layers on the val split, then Ultralytics' final
        validation of best.pt, so that the mAP and drop rates it reports are those of the calibrated model."""
        if RANK in {-1, 0} and self.best.exists() and token_routed_layers(unwrap_model(self.model)):
            args = copy(self.args)
            args.batch = self.batch_size  # resolved, where args.batch=-1 asks for AutoBatch
            calibrate_checkpoint(self.best, args, self.data, self.device)
        super().final_eval()

    def get_model(self, cfg=None, weights=None, verbose: bool = True) -> MoEModel:
        """Build the MoE model for this dataset's classes, optionally loading weights; dense weights
        (`pretrained=yolo11n.pt`) upcycle it: experts start from the dense blocks they replace."""
        model = build_model(
            cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=verbose and RANK == -1, **self.moe_overrides
        )
        model = self.set_model_names_for_load(model)
        settings = model.moe_settings
        self.domain_expert_of = domain_routing(settings, self.data)
        if settings.domain_loss == "auto" and self.domain_expert_of and verbose:
            LOGGER.info(
                f"domain routing: domain_loss=auto -> {resolve_domain_loss(settings, tagged=True).domain_loss} for "
                f"the {len(self.domain_expert_of)} images the data tags (domain_loss=0 lets the routers learn alone)"
            )
        if isinstance(weights, MoEModel):
            model.load(weights)
            reset_capacity(model)  # calibration fitted the loaded weights' routing, which training changes
        elif weights:
            upcycle(model, weights, verbose=verbose and RANK in {-1, 0})
        return model


# Optimizers with a fused CPU kernel (torch >= 2.4); the others step on CPU with foreach kernels at best.
FUSED_ON_CPU = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def use_fast_kernels(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Step every parameter group whose optimizer left the choice to torch with its fastest kernels; call it before
    the first step. The update is the same; only the kernels differ.

    On CPU torch's default loops over the tensors in Python. For Adam(W) and SGD on CPU the fused kernel updates each
    group in one pass (for the 4.1 M parameters of visionmoe-yolo-n, AdamW steps in 14 ms against 49 ms with foreach
    and more with the loop); elsewhere Ultralytics already fuses on CUDA, and the rest get multi-tensor (foreach) ops.
    """
    on_cpu = all(p.device.type == "cpu" for group in optimizer.param_groups for p in group["params"])
    fuse = on_cpu and type(optimizer) in FUSED_ON_CPU
    for group in optimizer.param_groups:
        if "foreach" not in group or group["foreach"] is not None or group.get("fused"):
            continue  # a choice made by whoever built the optimizer
        if fuse and "fused" in group:
            group["fused"] = True
        else:
            group["foreach"] = True
    return optimizer


def domain_routing(settings: MoESettings, data: dict[str, Any]) -> dict[str, int] | None:
    """{image stem: expert} of every tagged image for domain routing, or None when `domain_loss` is 0 or resolves to
    0 for `data` ('auto', see `resolve_domain_loss`)."""
    tags = load_domains(data) if settings.domain_loss else None
    settings = resolve_domain_loss(settings, tagged=bool(tags))
    if not settings.domain_loss:
        return None
    if not tags:
        raise ValueError(
            f"domain_loss={settings.domain_loss} needs per-image domain tags, and {data.get('yaml_file', 'the data')} "
            "has none: add `domains:` (a CSV of image,domain rows) to the data YAML, or set domain_loss=0"
        )
    experts = domain_experts(data, tags, settings.experts)
    return {stem: experts[domain] for stem, domain in tags.items()}


def drop_epochs_after(path: Path, epoch: int) -> None:
    """Rewrite a per-epoch CSV (first column 'epoch', counted from 1) without the rows after `epoch`, atomically."""
    lines = path.read_bytes().splitlines(keepends=True) if path.is_file() else []  # bytes keep csv's \r\n as is
    kept = lines[:1] + [row for row in lines[1:] if float(row.split(b",", 1)[0]) <= epoch]
    if len(kept) < len(lines):
        with replaced_atomically(path) as partial:
            partial.write_bytes(b"".join(kept))
        LOGGER.warning(f"Resume: dropped {len(lines) - len(kept)} rows after epoch {epoch} from {path.name}, "
                       "logged after the last checkpoint")  # fmt: skip


def check_usable_images(data: dict[str, Any]) -> None:
    """Raise a one-line error when a split has no decodable image (Ultralytics would stop later, mid-setup).

    Single unreadable images or bad labels are left to Ultralytics, which skips and counts them with a warning.
    """
    for split in ("train", "val"):
        folders = data[split] if isinstance(data[split], list) else [data[split]]
        files = [f for folder in folders for f in _image_files(Path(folder))]
        if not any(readable_image(f) for f in files):
            raise ValueError(
                f"no usable image in the '{split}' split of {data.get('yaml_file', 'the dataset')} "
                f"({len(files)} image files, none readable): check the images under {', '.join(map(str, folders))}"
            )


def _image_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(f for f in path.rglob("*.*") if is_image_file(f))
    if path.suffix == ".txt":  # a list of image paths, relative to the list's folder
        lines = (line.strip() for line in path.read_text().splitlines())
        return [path.parent / line if not Path(line).is_absolute() else Path(line) for line in lines if line]
    return [path]


def _seed_router_noise(trainer: MoEDetectionTrainer) -> None:
    for i, block in enumerate(unwrap_model(trainer.model).moe_blocks()):
        block.router.noise_seed = (trainer.args.seed + 1) * 10_007 + i  # distinct noise per block, fixed by seed


def split_epoch(trainer: MoEDetectionTrainer) -> int:
    """First epoch (0-based) in which the MoE blocks route: the end of the dense warmup, and at the latest the last
    epoch, so that every run trains its routers (at dense_warmup 0.7 a 1-epoch run would otherwise never route)."""
    warmup_epochs = round(unwrap_model(trainer.model).moe_settings.dense_warmup * trainer.epochs)
    return min(warmup_epochs, trainer.epochs - 1)


def _trained_models(trainer: MoEDetectionTrainer) -> list[MoEModel]:
    return [unwrap_model(trainer.model)] + ([trainer.ema.ema] if trainer.ema else [])


def _tie_for_dense_warmup(trainer: MoEDetectionTrainer) -> None:
    """Tie the experts of every per-image MoE block while the run is in its dense warmup (on resume too: the
    untrained copies are overwritten at the split, so the epoch alone says whether to tie)."""
    split_at = split_epoch(trainer)
    freeze = unwrap_model(trainer.model).moe_settings.freeze_expert_norm
    for model in _trained_models(trainer):
        for block in (b for b in model.moe_blocks() if b.routes_images):  # token-routed layers route throughout
            if trainer.start_epoch < split_at:
                block.tie()
            elif split_at > 0 and freeze:  # resumed after the split: the rebuilt blocks froze nothing yet
                block.freeze_norm()


def _split_after_dense_warmup(trainer: MoEDetectionTrainer) -> None:
    """At the end of the dense warmup, split every tied block into E copies of its expert, in the trained model and
    its EMA, give each copy the optimizer state (momentum, Adam moments) of the expert it copies, scale the experts'
    second moments by `split_moment_scale`, and freeze the experts' norm statistics where the settings ask for it.
    Under `residual_experts` the block splits into its expert and E-1 zero deltas on it instead, which start with
    fresh optimizer state."""
    if trainer.epoch < split_epoch(trainer):
        return
    tied = [block for model in _trained_models(trainer) for block in model.moe_blocks() if block.tied]
    settings = unwrap_model(trainer.model).moe_settings
    freeze = settings.freeze_expert_norm
    if tied and settings.router_init == "kmeans":
        _fit_routers_to_clusters(trainer)
    state = trainer.optimizer.state
    moment_scale = settings.moment_scale_at_split()
    scaled = 0
    for block in tied:
        for source, copy_ in block.split(residual=settings.residual_experts):
            if source in state:
                state[copy_] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state[source].items()}
        if moment_scale != 1:  # the EMA's parameters have no optimizer state
            for p in block.experts.parameters():
                if "exp_avg_sq" in state.get(p, {}):
                    state[p]["exp_avg_sq"].mul_(moment_scale)
                    scaled += 1
        if freeze:
            block.freeze_norm()
    if tied:
        LOGGER.info(f"MoE: dense warmup over at epoch {trainer.epoch + 1}; experts split and routing on")
    if tied and moment_scale != 1 and not scaled and settings.split_moment_scale != "auto":  # a default stays quiet
        LOGGER.warning(
            f"MoE: split_moment_scale={settings.split_moment_scale} had no effect: {type(trainer.optimizer).__name__} "
            "keeps no second moments; train with optimizer=AdamW (or Adam) to use it"
        )


def unaugmented_train_loader(trainer: MoEDetectionTrainer) -> torch.utils.data.DataLoader:
    """The train split in order, without augmentation, each image letterboxed to a square of imgsz as training crops
    it once mosaic closes (validation's rect batches would add a border that moves pooled router inputs, see
    benchmarks/router_padding.py)."""
    args, data = trainer.args, trainer.data
    dataset = build_yolo_dataset(args, data["train"], trainer.batch_size, data, mode="val", fraction=args.fraction)
    return build_dataloader(dataset, trainer.batch_size, args.workers, shuffle=False, device=trainer.device)


def _fit_routers_to_clusters(trainer: MoEDetectionTrainer) -> None:
    """Start every tied block's router as a nearest-centroid gate over E k-means clusters of its inputs on the
    un-augmented training images (`router_init.nearest_centroid_gate`), in the trained model and its EMA.

    The features come from one pass of the trained model in eval mode over the un-augmented train split: clusters of
    photometric augmentation would route val images to experts trained on looks they never have.
    """
    model = unwrap_model(trainer.model)
    blocks = [block for block in model.moe_blocks() if block.tied]
    features: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = [
        block.register_forward_pre_hook(lambda b, inputs, f=f: f.append(b.router_input(inputs[0])))
        for f, block in zip(features, blocks)
    ]
    loader = unaugmented_train_loader(trainer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                model(trainer.preprocess_batch(batch)["img"])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    generator = torch.Generator().manual_seed(trainer.args.seed)
    gates = [
        nearest_centroid_gate(torch.cat(f).cpu(), block.router.num_experts, generator)
        for block, f in zip(blocks, features)
    ]
    for trained in _trained_models(trainer):  # the EMA's tied blocks come in the same order as the model's
        for block, (weight, bias) in zip([b for b in trained.moe_blocks() if b.tied], gates):
            block.router.gate[0].weight.data.copy_(weight)
            block.router.gate[0].bias.data.copy_(bias)
    LOGGER.info(f"MoE: routers of {len(blocks)} blocks start from k-means clusters of {len(loader.dataset)} images")


def _track_utilisation(trainer: MoEDetectionTrainer) -> None:
    trainer.utilisation.update(unwrap_model(trainer.model).named_moe_blocks())


def _write_utilisation(trainer: MoEDetectionTrainer) -> None:
    if RANK in {-1, 0}:
        trainer.utilisation.write(trainer.save_dir / UTILISATION_CSV, trainer.epoch + 1)


def _write_routing_summary(trainer: MoEDetectionTrainer) -> None:
    """Summarise the routing of the last validation (the final one on best.pt) in the run folder; no figures."""
    routing = getattr(trainer.validator, "routing", None) if RANK in {-1, 0} else None
    if routing is not None and routing.layers:
        info = run_info(trainer.args, trainer.metrics, model=trainer.best)
        write_analysis(routing, trainer.save_dir, info, plots=False)
