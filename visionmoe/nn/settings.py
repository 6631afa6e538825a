"""MoE settings: one validated record per model, read from the `moe:` section of a model YAML."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from difflib import get_close_matches
from typing import Any

ROUTERS = ("linear", "mlp")
ROUTER_INPUTS = ("mean", "mean_std", "max")
ROUTER_INITS = ("random", "kmeans")
DEFAULT_CAPACITY_FACTOR = (1.25, 2.0)  # (train, eval) for token-routed layers whose model sets none (V-MoE style)


@dataclass(frozen=True)
class MoESettings:
    """Settings shared by every MoE layer of a model.

    Attributes:
        experts: Number of routed experts per MoE layer (E).
        top_k: Experts each sample (or token) runs (k), a constant so that exported graphs stay static.
        router: Gate type, 'linear' (one linear layer) or 'mlp' (linear-SiLU-linear).
        router_input: What a per-image router reads from the block's features [B, C, H, W]: their spatial 'mean'
            [B, C], or 'mean_std' [B, 2C], which adds each channel's spatial standard deviation, the texture and
            contrast statistics (noise, blur) that a mean averages away, or 'max' [B, C], each channel's spatial
            maximum, which a flat letterbox border barely moves (a mean shifts with the border's share of the image).
        router_context: Index of an earlier layer (its row in the model YAML) whose output map every per-image router
            also reads, pooled to channel means and standard deviations: fine detail such as blur or sensor noise,
            which the block's own features at strides 8 to 32 average away (layer 2 of YOLO11 is at stride 4).
            None: routers read their block's features only.
        detach_router: True: routers read the features without sending gradients into them: their losses (balance,
            z, mutual information, domain) and the gates' task gradient train the routers alone, never the detector's
            features, so that learning to route does not bend what the experts and the head read. 'warmup': so only
            while per-image blocks are tied (the dense warmup, when domain routing already teaches the routers), and
            with gradients into the features once the experts split; without a dense warmup (dense_warmup=0, or
            token-routed layers, which are never tied) the same as False. False: gradients always.
        router_init: How per-image routers start when routing starts at the end of the dense warmup: 'random'
            (as built) or 'kmeans' (a nearest-centroid gate over E k-means clusters of the router's inputs on the
            un-augmented training images, `router_init.nearest_centroid_gate`). 'kmeans' needs a linear router and
            dense_warmup > 0.
        mask_letterbox: Per-image routers pool their block's features only over cells whose input pixels are not all
            Ultralytics' letterbox fill (grey 114), so that a border (validation pads half a stride, prediction pads
            to the image's aspect ratio, mosaic and scale augmentation fill with it) does not move their input.
            Needs router_input='mean'.
        shared_expert: Add an always-on expert beside the routed ones (DeepSeekMoE style).
        renormalize: Rescale the k chosen gates to sum to 1 (Mixtral style); off keeps Switch-style gates.
        noise: Std of Gaussian noise added to router logits in training only (V-MoE uses 1/E); 0 disables it.
        capacity_factor: (train, eval) capacity factors of token-routed layers, C = ceil(k*T*cf/E).
        bpr: Batch Prioritized Routing in token-routed layers: tokens with the highest top gate claim expert
            capacity first, so tight capacity drops low-priority tokens instead of the last ones in raster order.
        balance_loss: Weight alpha of the Switch load-balance loss.
        z_loss: Weight beta of the ST-MoE router z-loss.
        mi_loss: Weight gamma of the mutual-information loss between items and experts (`routing.
            mutual_information_loss`): confident routers that still use every expert.
        dense_warmup: Fraction of the training epochs in which every per-image MoE block runs a single expert for
            every image (experts tied, routers idle); then the trainer copies it into all E experts and routing
            starts (sparse upcycling within one run), so that no expert starts from scratch on 1/E of the data.
            0 routes from the first step; the last epoch always routes. Needs renormalize=True, so that the split
            block computes what the tied one did.
        freeze_expert_norm: After the dense warmup, the experts' BatchNorms normalise with the running statistics the
            tied expert gathered over full batches, in training as in eval, instead of the statistics of the few
            images routed to them (scale and shift still train). Needs dense_warmup > 0.
        residual_experts: At the end of the dense warmup, expert 0 stays the tied expert and every other expert
            becomes a delta on it, starting at zero: expert e computes with weights expert_0 + delta_e
            (`experts.ResidualExpert`). Expert 0 then keeps learning from every image, through whichever expert the
            image chose, and each delta from its own images; the default split copies expert 0 into E independent
            experts, each of which learns from its share of the images alone. Active compute is unchanged; fusion
            and export fold the sums into independent experts (`MoEBlock.fold_residual`). Needs dense_warmup > 0.
        split_moment_scale: At the end of the dense warmup, multiply every routed expert's Adam second moment (v)
            by this. The copies inherit the tied expert's v, built from the gradients of every image; a routed
            expert's gradient comes from its own images only (about k/E of them), so with the inherited v it steps
            at a fraction of the tied step until v forgets (beta2=0.999: ~1000 steps). k/E lets each expert step as
            far as the tied one did; 1 keeps the inherited v. 'auto': k/E where the experts split by copying
            (dense_warmup > 0, residual_experts=False), else 1 (`moment_scale_at_split`). Optimizers without a
            second moment (SGD) ignore it. A number other than 1 needs dense_warmup > 0 and residual_experts=False
            (a residual split's deltas start with fresh state).
        domain_loss: Weight of each per-image router's class-balanced cross-entropy with the expert of the image's
            domain (DAMEX-style domain routing, for data sets merged from sources that differ in look or labelling;
            `routing.domain_loss`). When > 0, training routes every tagged image to its domain's expert and teaches
            the routers to predict it, from the first epoch (during a dense warmup the routers learn while one expert
            computes); validation and prediction route from the pixels alone. Needs domain tags in the data
            (`domains:`, see `analysis.domains.domain_experts` for how domains map to experts), top_k=1 and
            renormalize=True. 'auto' (kept as such in checkpoints, so that a model trained on tagged data fine-tunes
            on untagged data): AUTO_DOMAIN_LOSS where the data tags domains and the model fits (per-image blocks,
            top_k=1, renormalize=True), and 0 elsewhere (`resolve_domain_loss`).
    """

    experts: int = 4
    top_k: int = 1
    router: str = "linear"
    router_input: str = "mean"
    router_context: int | None = None
    detach_router: bool | str = False
    router_init: str = "random"
    mask_letterbox: bool = False
    shared_expert: bool = False
    renormalize: bool = False
    noise: float = 0.0
    capacity_factor: tuple[float, float] | None = None
    balance_loss: float = 0.01
    z_loss: float = 0.001
    mi_loss: float = 0.0
    bpr: bool = False
    dense_warmup: float = 0.0
    freeze_expert_norm: bool = False
    residual_experts: bool = False
    split_moment_scale: float | str = 1.0
    domain_loss: float | str = "auto"

    def __post_init__(self) -> None:
        def fail(problem: str) -> None:
            raise ValueError(f"invalid MoE setting: {problem}")

        if not isinstance(self.experts, int) or isinstance(self.experts, bool) or self.experts < 1:
            fail(f"experts={self.experts!r}, use an integer >= 1")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 1 <= self.top_k <= self.experts:
            fail(f"top_k={self.top_k!r} with experts={self.experts}, use 1 <= top_k <= experts")
        if self.router not in ROUTERS:
            fail(f"router={self.router!r}, use one of {list(ROUTERS)}")
        if self.router_input not in ROUTER_INPUTS:
            fail(f"router_input={self.router_input!r}, use one of {list(ROUTER_INPUTS)}")
        if self.router_init not in ROUTER_INITS:
            fail(f"router_init={self.router_init!r}, use one of {list(ROUTER_INITS)}")
        for name in ("mask_letterbox", "shared_expert", "renormalize", "bpr", "freeze_expert_norm", "residual_experts"):
            if not isinstance(getattr(self, name), bool):
                fail(f"{name}={getattr(self, name)!r}, use True or False")
        if not (isinstance(self.detach_router, bool) or self.detach_router == "warmup"):
            fail(f"detach_router={self.detach_router!r}, use True, False or 'warmup'")
        if self.mask_letterbox and self.router_input != "mean":
            fail(f"mask_letterbox=True needs router_input='mean' (got {self.router_input!r})")
        for name in ("noise", "balance_loss", "z_loss", "mi_loss", "domain_loss"):
            value = getattr(self, name)
            if name == "domain_loss" and value == "auto":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                fail(f"{name}={value!r}, use a number >= 0" + (" or 'auto'" if name == "domain_loss" else ""))
        if not isinstance(self.dense_warmup, (int, float)) or isinstance(self.dense_warmup, bool) or not (
            0 <= self.dense_warmup < 1
        ):
            fail(f"dense_warmup={self.dense_warmup!r}, use the fraction of epochs trained tied, 0 <= dense_warmup < 1")
        if self.dense_warmup > 0 and not self.renormalize:
            fail(
                f"dense_warmup={self.dense_warmup} needs renormalize=True, so that the experts split from the tied "
                "one compute what it did (chosen gates sum to 1); set renormalize=True or dense_warmup=0"
            )
        if self.router_context is not None and (
            not isinstance(self.router_context, int) or isinstance(self.router_context, bool) or self.router_context < 0
        ):
            fail(f"router_context={self.router_context!r}, use a layer index (>= 0) before the MoE blocks, or None")
        if self.router_init == "kmeans" and (self.router != "linear" or not self.dense_warmup > 0):
            fail(
                f"router_init='kmeans' needs router='linear' and dense_warmup > 0 (got router={self.router!r}, "
                f"dense_warmup={self.dense_warmup}): the clusters are fitted when the warmup ends"
            )
        if self.domain_loss != "auto" and self.domain_loss > 0 and (self.top_k != 1 or not self.renormalize):
            fail(
                f"domain_loss={self.domain_loss} needs top_k=1 and renormalize=True (got top_k={self.top_k}, "
                f"renormalize={self.renormalize}): each image runs its domain's one expert with gate 1"
            )
        if self.freeze_expert_norm and not self.dense_warmup > 0:
            fail("freeze_expert_norm=True needs dense_warmup > 0, whose full batches give the statistics it freezes")
        if self.residual_experts and not self.dense_warmup > 0:
            fail("residual_experts=True needs dense_warmup > 0: the experts become deltas on the tied one at the split")
        scale = self.split_moment_scale
        if scale != "auto" and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= 1):
            fail(
                f"split_moment_scale={scale!r}, use a number in (0, 1] (1 keeps the tied expert's second moments) "
                "or 'auto'"
            )
        if scale not in ("auto", 1) and (not self.dense_warmup > 0 or self.residual_experts):
            fail(
                f"split_moment_scale={scale} needs dense_warmup > 0 and residual_experts=False (got "
                f"dense_warmup={self.dense_warmup}, residual_experts={self.residual_experts}): it scales the copies "
                "made at the split"
            )
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            if isinstance(cf, (int, float)) and not isinstance(cf, bool):
                cf = (cf, cf)
            if not (isinstance(cf, (list, tuple)) and len(cf) == 2 and all(isinstance(c, (int, float)) for c in cf)):
                fail(f"capacity_factor={self.capacity_factor!r}, use one number or [train, eval]")
            if min(cf) <= 0:
                fail(f"capacity_factor={self.capacity_factor!r}, capacity factors must be > 0")
            object.__setattr__(self, "capacity_factor", (float(cf[0]), float(cf[1])))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Names of all settings, as they appear in YAML files and on the command line."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, source: str = "moe settings") -> MoESettings:
        """Build settings from a mapping, naming any unknown key and its closest valid spelling."""
        values = dict(values or {})
        check_keys(values, source)
        return cls(**values)

    def moment_scale_at_split(self) -> float:
        """The factor on the experts' second moments when the dense warmup ends (`split_moment_scale`)."""
        if self.split_moment_scale != "auto":
            return float(self.split_moment_scale)
        copies = self.dense_warmup > 0 and not self.residual_experts
        return self.top_k / self.experts if copies else 1.0

    def replace(self, **overrides: Any) -> MoESettings:
        """Return a copy with `overrides` applied and validated."""
        check_keys(overrides, "MoE overrides")
        return MoESettings(**{**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for YAML files and checkpoints (tuples become lists)."""
        d = asdict(self)
        if d["capacity_factor"] is not None:
            d["capacity_factor"] = list(d["capacity_factor"])
        return d


AUTO_DOMAIN_LOSS = 0.1  # the weight domain_loss='auto' takes on tagged data (benchmarks/results/recipe.md, stops 25-27)


def resolve_domain_loss(settings: MoESettings, tagged: bool) -> MoESettings:
    """`settings` with domain_loss='auto' made a number for data that does (`tagged`) or does not tag domains:
    AUTO_DOMAIN_LOSS where the routers can take one domain expert per image (top_k=1, renormalize=True), else 0.
    Numbers stay as they are; token-only models never keep 'auto' (`tasks._fit_routing_settings`)."""
    if settings.domain_loss != "auto":
        return settings
    fits = tagged and settings.top_k == 1 and settings.renormalize
    return settings.replace(domain_loss=AUTO_DOMAIN_LOSS if fits else 0.0)


def check_keys(values: dict[str, Any], source: str) -> None:
    """Raise a one-line error for keys that are not MoE settings."""
    valid = MoESettings.keys()
    for key in values:
        if key not in valid:
            close = get_close_matches(key, valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown key '{key}' in {source}{hint}; valid MoE keys are {', '.join(valid)}")


def pop_moe_overrides(args: dict[str, Any]) -> dict[str, Any]:
    """Remove MoE keys from an Ultralytics argument dict and return them, so that its key check stays strict."""
    return {k: args.pop(k) for k in MoESettings.keys() if k in args}
