"""MoE blocks: drop-in sparse replacements for dense Ultralytics blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from copy import deepcopy
from typing import Literal, get_args

import torch
from torch import nn
from ultralytics.nn.modules import C2PSA, C3k2

from .dispatch import (
    batched_mixture,
    buffer_rows,
    combine_tokens,
    dense_mixture,
    dispatch_tokens,
    run_experts,
    sparse_mixture,
    static_mixture,
    token_dense_mixture,
)
from .experts import BottleneckStack, MlpExperts, ResidualExpert, reinitialize
from .router import Router
from .routing import Routing, assign, expert_capacities, token_slots
from .settings import MoESettings
from .static import BranchExperts, GatheredExperts, StaticExportError

Dispatch = Literal["sparse", "batched", "dense", "gather", "branch"]
STATIC_DISPATCHES = ("gather", "branch")  # the export forms, built by `static_experts_form`


class MoEBlock(nn.Module):
    """Base of all MoE blocks: holds the router, the experts and the last routing decision.

    `dispatch` picks how the experts run: 'sparse' (only chosen experts compute, the default), 'batched' (the same
    result with one call per expert layer, see `batched_mixture`), 'dense' (the reference: every expert runs and
    unchosen ones are weighted 0), or one of the static export forms, in which
    only chosen experts compute with static shapes: 'gather' (branch-free tensor code over gathered weights) or
    'branch' (each expert its own constant-weight module, selected through ONNX `If` in export); `set_dispatch`
    builds the form. Routing is the same in all of them. Export calls `set_dispatch` with a static form on every
    block: a family whose forward is already static (e.g. fixed-capacity token routing) overrides
    `static_experts_form` to return its own experts; one without a static form keeps the default, which raises
    StaticExportError, and export refuses the model.
    """

    dense: type[nn.Module]  # the Ultralytics block this one replaces, as built by the stock parser
    routes_images = False  # per-image routing, whose experts can be tied for a dense warmup
    tied = False  # dense warmup: experts[0] runs for every item and the router is idle (see `tie`)
    residual = False  # after a residual split, experts[1:] hold deltas on experts[0] (see `split`)
    frozen_norm = False  # experts' BatchNorms normalise with running statistics in training too (see `freeze_norm`)

    def __init__(self) -> None:
        super().__init__()
        self.dispatch: Dispatch = "sparse"
        self.routing: Routing | None = None
        self.assigned: torch.Tensor | None = None  # [B] expert per image for this forward, -1 = the router's choice

    def __getstate__(self) -> dict:
        # The last routing and the assignment are scratch state of one forward; never pickle them into checkpoints.
        return {**super().__getstate__(), "routing": None, "assigned": None}

    def params_per_expert(self) -> int:
        """Parameters of one routed expert (all experts of a block have the same shape)."""
        return sum(p.numel() for p in self.experts[0].parameters())

    def tie(self) -> None:
        """Start the dense warmup: until `split`, experts[0] alone runs, for every item, with gate 1."""
        if not self.routes_images:
            raise ValueError(f"MoE block {self.router.label} routes tokens; only per-image blocks can be tied")
        if not self.router.renormalize:
            raise ValueError(f"MoE block {self.router.label}: tied experts need renormalize=True to split exactly")
        self.tied = True
        if self.router.detach_while_tied:  # detach_router='warmup'
            self.router.detach_input = True

    def split(self, residual: bool = False) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """End the dense warmup: copy experts[0] (weights and norm statistics; `split_source` names the source, which a
        subclass may vary) into every other expert and route.

        With renormalized gates every choice then computes what the tied block did. Returns (source, copy) pairs of
        parameters, so that a trainer can copy optimizer state along. `residual` (the `residual_experts` setting):
        the other experts become deltas on experts[0] instead, starting at zero, with their own norm statistics
        (`ResidualExpert`); every choice again computes what the tied block did, and there are no pairs, since a
        delta starts with fresh optimizer state.
        """
        self.tied = False
        if self.router.detach_while_tied:
            self.router.detach_input = False
        pairs = []
        with torch.no_grad():
            for i, expert in enumerate(self.experts):
                source = self.experts[self.split_source(i)]
                if expert is source:
                    continue
                for a, b in zip(source.parameters(), expert.parameters()):
                    if residual:
                        b.zero_()
                    else:
                        b.copy_(a)
                        pairs.append((a, b))
                for a, b in zip(source.buffers(), expert.buffers()):
                    b.copy_(a)
        self.residual = residual
        return pairs

    def split_source(self, index: int) -> int:
        """The tied expert that `split` copies into expert `index`: experts[0] for every expert here."""
        return 0

    def routed_experts(self) -> nn.ModuleList | list[nn.Module]:
        """The experts as routing runs them: `experts`, or after a residual split experts[0] and the
        `ResidualExpert` views base + delta_e."""
        if not self.residual:
            return self.experts
        base = self.experts[0]
        return [base, *(ResidualExpert(base, delta) for delta in self.experts[1:])]

    def fold_residual(self) -> None:
        """After a residual split, make every expert independent (experts[e] <- experts[0] + delta_e), computing what
        it did: for inference, where Conv+BN fusion and the static export forms need each expert's own weights."""
        if self.residual:
            for view in self.routed_experts()[1:]:
                view.fold()
            self.residual = False

    def freeze_norm(self) -> None:
        """Make the experts' BatchNorms use their running statistics in training as in eval (scale and shift still
        train). A routed expert sees only its few images of a batch, whose statistics are noisy; after a dense warmup
        the running statistics are those of full batches."""
        self.frozen_norm = True
        self.train(self.training)

    def train(self, mode: bool = True) -> MoEBlock:
        """nn.Module.train, leaving frozen expert norms in eval mode."""
        super().train(mode)
        if self.frozen_norm:
            for m in self.experts.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def set_dispatch(self, dispatch: Dispatch) -> MoEBlock:
        """Choose how the experts run; a static form snapshots them into their export form (inference only).

        A tied block splits first: that keeps its output and lets every form route.
        """
        if dispatch not in get_args(Dispatch):
            raise ValueError(f"unknown dispatch '{dispatch}', use one of {list(get_args(Dispatch))}")
        if self.tied:
            self.split()
        if dispatch in STATIC_DISPATCHES:
            self.fold_residual()
        self.static_experts = self.static_experts_form(dispatch) if dispatch in STATIC_DISPATCHES else None
        self.dispatch = dispatch
        return self

    def static_experts_form(self, dispatch: Dispatch) -> nn.Module:
        """Static form `dispatch` of the experts: (x [N, ...], index [N]) -> [N, ...out], for `static_mixture`."""
        raise StaticExportError(f"{type(self).__name__} has no static dispatch, so it cannot export sparsely")

    def mixture(self, x: torch.Tensor, experts: Sequence[nn.Module], routing: Routing) -> torch.Tensor:
        if self.dispatch in STATIC_DISPATCHES:  # inference only: gates that are all 1 need no multiply
            gates = None if self.router.unit_gates else routing.gates
            return static_mixture(x, self.static_experts, routing.indices, gates)
        if self.residual and self.dispatch == "batched":
            raise ValueError("dispatch 'batched' walks the experts' own weights; residual experts run with 'sparse'")
        mix = {"sparse": sparse_mixture, "batched": batched_mixture, "dense": dense_mixture}[self.dispatch]
        return mix(x, experts, routing.indices, routing.gates)


class MoEC3k2(MoEBlock):
    """C3k2 whose bottleneck chain becomes E experts, k of them chosen per image by a router on the block's features.

    x [B, c1, H, W] -> cv1 -> split (a, b); h = sum_j gate_j * expert_j(b) (+ shared(b)); cv2(cat(a, b, h))
    -> [B, c2, H, W]. The input and output convs stay dense, so at k=1 the block costs what C3k2 costs. Under
    `router_context` the block's input is [x, context], an earlier layer's map that the router reads beside b.
    """

    dense = C3k2
    routes_images = True

    def __init__(
        self, cv1: nn.Module, cv2: nn.Module, experts: list[nn.Module], router: Router, shared: nn.Module | None
    ):
        super().__init__()
        self.cv1, self.cv2 = cv1, cv2
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.shared = shared

    @classmethod
    def from_dense(
        cls, block: C3k2, settings: MoESettings, upcycle: bool = False, context_channels: int = 0
    ) -> MoEC3k2:
        """Build from a dense C3k2, reusing its convs; experts copy its bottlenecks (upcycle) or start fresh, except
        expert 0, which takes them over, so that a tied MoE starts as the dense model built from the same seed.
        context_channels: channels of the `router_context` map the router also reads (0: none)."""

        def expert() -> BottleneckStack:
            blocks = deepcopy(block.m)
            return BottleneckStack(blocks if upcycle else reinitialize(blocks))

        experts = [BottleneckStack(block.m)] + [expert() for _ in range(settings.experts - 1)]
        shared = expert() if settings.shared_expert else None
        return cls(block.cv1, block.cv2, experts, Router(block.c, settings, context_channels), shared)

    def static_experts_form(self, dispatch: Dispatch) -> GatheredExperts | BranchExperts:
        """BN-folded experts: stacked, as a grouped conv per layer ('gather'), or one module each ('branch')."""
        return BranchExperts(self.experts) if dispatch == "branch" else GatheredExperts(self.experts)

    @property
    def c(self) -> int:
        """Hidden channels: each half of cv1's output."""
        return self.cv1.conv.out_channels // 2

    def router_input(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """What the router reads for the block input x (or [x, context]): pooled features [B, D] (`Router.pool`)."""
        x, context = x if isinstance(x, list) else (x, None)
        return self.router.pool(self.cv1(x).split((self.c, self.c), 1)[1], context)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        x, context = x if isinstance(x, list) else (x, None)
        a, b = self.cv1(x).split((self.c, self.c), 1)  # constant sizes keep traced graphs static, as C2f.forward_split
        if self.tied:  # one expert for all; the router idles, unless domain routing teaches it already
            self.routing = None if self.assigned is None else assign(self.router(b, context), self.assigned)
            h = self.experts[0](b)
        else:
            self.routing = self.router(b, context)
            if self.assigned is not None:  # domain routing in training (MoEModel.loss)
                self.routing = assign(self.routing, self.assigned)
            h = self.mixture(b, self.routed_experts(), self.routing)
        if self.shared is not None:
            h = h + self.shared(b)
        return self.cv2(torch.cat((a, b, h), 1))


class MoEMlp(MoEBlock):
    """Token-routed MoE MLP (V-MoE): each token runs its top-k of E expert MLPs, within a per-image capacity.

    x [B, T, D] tokens, or a map [B, D, H, W] whose H*W positions are the tokens -> the same shape. In training each
    expert takes at most C = ceil(k*T*cf/E) tokens per image, cf = capacity_factor[0]; in eval expert e takes at
    most C_e = ceil(k*T*cf_e/E), with `eval_capacity_factors` cf_e: capacity_factor[1] for every expert until
    `nn.capacity.calibrate_capacity` fits one per expert to measured routing. Assignments past their expert's
    capacity are dropped and add 0, so the residual around the block carries the token on. Routing stays within an
    image, so no output depends on the rest of the batch. `kept` is the last forward's [B, T, k] mask of assignments
    that got a slot.
    """

    def __init__(self, dim: int, hidden: int, settings: MoESettings, act: type[nn.Module] = nn.GELU):
        super().__init__()
        if settings.capacity_factor is None:
            raise ValueError("token-routed MoE layers need capacity_factor=[train, eval] in the MoE settings")
        self.router = Router(dim, settings)
        self.experts = MlpExperts(settings.experts, dim, hidden, act)
        self.shared = MlpExperts(1, dim, hidden, act) if settings.shared_expert else None
        self.capacity_factor = settings.capacity_factor  # (train, eval) as configured; eval caps calibration
        self._init_eval_capacity()
        self.bpr = settings.bpr
        self.kept: torch.Tensor | None = None

    def _init_eval_capacity(self, factor: float | None = None) -> None:
        # The eval factors in thousandths, as an integer buffer: checkpointed with the weights, and exact through fp16
        # checkpoints and the EMA, which both change float state only.
        factor = self.capacity_factor[1] if factor is None else factor
        self.register_buffer("eval_capacity_milli", torch.full((self.experts.num_experts,), _milli(factor)))

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "kept": None}  # scratch state, like `routing`

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "eval_capacity_milli" not in self._buffers:  # pickled by a visionmoe without eval capacity calibration
            self._init_eval_capacity()
        elif self.eval_capacity_milli.dim() == 0:  # pickled by a visionmoe with one calibrated factor per layer
            self._init_eval_capacity(int(self.eval_capacity_milli) / 1000)

    @property
    def eval_capacity_factors(self) -> tuple[float, ...]:
        """Capacity factor of each expert in eval (to 1/1000): capacity_factor[1], or what calibration fitted."""
        return tuple(m / 1000 for m in self.eval_capacity_milli.tolist())  # Python numbers: constant capacities

    @eval_capacity_factors.setter
    def eval_capacity_factors(self, factors: float | Sequence[float]) -> None:
        """One factor for every expert, or one per expert; they may average at most the configured eval factor."""
        e, configured = self.experts.num_experts, self.capacity_factor[1]
        milli = [_milli(f) for f in ([factors] * e if isinstance(factors, (int, float)) else factors)]
        if len(milli) != e or min(milli) < 0 or not 0 < sum(milli) <= e * _milli(configured):
            raise ValueError(
                f"eval capacity factors {factors!r}: give one factor or {e}, each >= 0, averaging more than 0 and at "
                f"most the configured capacity_factor[1]={configured:g}"
            )
        self.eval_capacity_milli.copy_(torch.tensor(milli))

    @property
    def dropped(self) -> float | None:
        """Fraction of the last forward's top-k assignments that found their expert full."""
        return None if self.kept is None else 1.0 - self.kept.float().mean().item()

    def params_per_expert(self) -> int:
        return self.experts.params_per_expert()

    def static_experts_form(self, dispatch: Dispatch) -> MlpExperts:
        """The sparse token path is already branch-free with static shapes, so it is every export form."""
        return self.experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.dim() == 4
        if spatial:
            b, d, h, w = x.shape
            x = x.flatten(2).transpose(1, 2)
        self.routing = routing = self.router(x)
        num_experts = self.experts.num_experts
        factors = (self.capacity_factor[0],) * num_experts if self.training else self.eval_capacity_factors
        capacities = expert_capacities(x.shape[1], self.router.top_k, factors)
        slots, self.kept = token_slots(routing.indices, routing.gates, num_experts, capacities, self.bpr)
        gates = routing.gates * self.kept
        if self.dispatch == "dense":
            y = token_dense_mixture(x, self.experts, routing.indices, gates)
        else:  # 'sparse' and the static forms alike
            rows = buffer_rows(routing.indices, slots, self.kept, capacities)
            y = run_experts(self.experts, dispatch_tokens(x, rows, capacities), capacities)
            y = combine_tokens(y, rows, gates)
        if self.shared is not None:
            y = y + self.shared(x.unsqueeze(1)).squeeze(1)
        return y.transpose(1, 2).reshape(b, d, h, w) if spatial else y


def _milli(factor: float) -> int:
    """A capacity factor in thousandths, rounded up so that it never gives fewer slots (1.1 -> 1100, not 1101)."""
    return math.ceil(round(factor * 1000, 6))


class MoEC2PSA(nn.Module):
    """C2PSA whose PSABlock feed-forward layers are token-routed MoE MLPs, one router per PSABlock.

    x [B, c1, H, W] -> cv1 -> split (a, b); b -> PSABlocks (attention, then an MoEMlp over b's H*W tokens);
    cv2(cat(a, b)) -> [B, c1, H, W]. Experts are SiLU MLPs c -> 2c -> c, the shape of PSABlock's dense FFN.
    """

    dense = C2PSA
    forward = C2PSA.forward  # same data flow as the dense block; only the PSABlocks' FFNs differ

    def __init__(self, c: int, cv1: nn.Module, cv2: nn.Module, m: nn.Sequential):
        super().__init__()
        self.c, self.cv1, self.cv2, self.m = c, cv1, cv2, m

    @classmethod
    def from_dense(cls, block: C2PSA, settings: MoESettings) -> MoEC2PSA:
        """Build from a dense C2PSA, taking over its convs and PSABlocks and giving each PSABlock an MoE FFN."""
        for psa in block.m:
            psa.ffn = MoEMlp(block.c, 2 * block.c, settings, act=nn.SiLU)
        return cls(block.c, block.cv1, block.cv2, block.m)


# YAML names of MoE layers; each has `dense` (the block the stock parser builds for the row) and `from_dense`.
MOE_BLOCKS: dict[str, type[nn.Module]] = {"MoEC3k2": MoEC3k2, "MoEC2PSA": MoEC2PSA}
TOKEN_ROUTED = frozenset({"MoEC2PSA"})  # the rows that route tokens, and so read capacity_factor and bpr
