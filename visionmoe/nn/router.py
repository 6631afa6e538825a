"""Router: scores the experts from visual features and picks the top-k."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .routing import Routing, route
from .settings import MoESettings


class SharedContext:
    """The `router_context` map's channel means and standard deviations, pooled once per forward for every router
    that reads it: every per-image router reads the same stride-4 map, and pooling it per router cost 12% of a
    training step (forward and backward) at imgsz 128 on CPU."""

    def __init__(self) -> None:
        self.map: torch.Tensor | None = None
        self.pooled: torch.Tensor | None = None

    def __call__(self, router: Router, context: torch.Tensor) -> torch.Tensor:
        """[B, C0, H0, W0] -> fp32 [B, 2 C0], as `router._mean_std(context, True)`, computed once per map."""
        if self.map is not context:
            self.map, self.pooled = context, router._mean_std(context, True)
        return self.pooled


class Router(nn.Module):
    """Gate over E experts, run in fp32 whatever the model's precision.

    Per image: x [B, C, H, W] is pooled to its channel means [B, C] (with `router_input='mean_std'`, also their
    standard deviations, [B, 2C]; with 'max', channel maxima [B, C]), giving logits [B, E]. With `router_context`,
    the means and standard deviations of an earlier layer's map context [B, C0, H0, W0] join them ([B, 2 C0] more).
    Per token: x [B, T, C] gives logits [B, T, E].
    """

    pool_std = False  # class defaults: routers pickled before router_input existed read means only
    pool_max = False
    context_channels = 0  # and before router_context existed, their block's features only
    detach_input = False  # and before detach_router existed, sent gradients into the features they read
    detach_while_tied = False  # and before detach_router could be 'warmup'
    content: torch.Tensor | None = None  # [B, 1, H0, W0] image cells that are not letterbox fill, set per forward
    shared_context: SharedContext | None = None  # the context map pooled once for all routers, set per forward

    def __init__(self, channels: int, settings: MoESettings, context_channels: int = 0):
        super().__init__()
        self.num_experts = settings.experts
        self.top_k = settings.top_k
        self.renormalize = settings.renormalize
        self.noise = settings.noise
        e = settings.experts
        self.pool_std = settings.router_input == "mean_std"
        self.pool_max = settings.router_input == "max"
        self.context_channels = context_channels
        self.detach_input = settings.detach_router is True
        self.detach_while_tied = settings.detach_router == "warmup"  # `MoEBlock.tie` and `split` switch detach_input
        c = channels * (2 if self.pool_std else 1) + 2 * context_channels
        layers = [nn.Linear(c, e)] if settings.router == "linear" else [nn.Linear(c, c), nn.SiLU(), nn.Linear(c, e)]
        self.gate = nn.Sequential(*layers)
        self.label = "router"  # the owning block's module name, set by build_model; names it in errors
        # Gate noise comes from a generator seeded by (noise_seed, noise_step). The step is a checkpointed buffer,
        # so a resumed run continues the noise sequence where the interrupted one stopped.
        self.noise_seed = 0
        self.register_buffer("noise_step", torch.zeros((), dtype=torch.long))

    @property
    def unit_gates(self) -> bool:
        """True when every gate is exactly 1 in value (renormalized top-1), so inference needs no gate multiply."""
        return self.top_k == 1 and self.renormalize

    def noise_generator(self, device: torch.device) -> torch.Generator:
        """Generator for this step's gate noise; advances the step."""
        step = int(self.noise_step)
        self.noise_step += 1
        return torch.Generator(device).manual_seed(self.noise_seed * 1_000_003 + step)

    def pool(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] -> fp32 [B, C] channel means or maxima, or [B, 2C] means and standard deviations; with a
        context map [B, C0, H0, W0], its channel means and standard deviations [B, 2 C0] follow."""
        pooled = x.amax((2, 3)).float() if self.pool_max else self._mean_std(x, self.pool_std)
        if context is None:
            return pooled
        shared = self.shared_context
        return torch.cat((pooled, shared(self, context) if shared else self._mean_std(context, True)), 1)

    def _mean_std(self, x: torch.Tensor, std: bool) -> torch.Tensor:
        """[B, C, H, W] -> fp32 [B, C] means, and with std [B, 2C] means and standard deviations."""
        if self.content is not None:  # mean over content cells only (`MoEModel.mask_letterbox`)
            h0, w0 = self.content.shape[-2:]
            cells = F.max_pool2d(self.content, (h0 // x.shape[-2], w0 // x.shape[-1]), ceil_mode=True)
            mean = (x * cells).sum((2, 3)).float() / cells.sum((2, 3)).clamp(min=1).float()
        else:
            mean = x.mean((2, 3)).float()
        if not std:
            return mean
        deviation = (x.float() - mean[..., None, None]).square().mean((2, 3)).add(1e-6).sqrt()  # eps: finite gradient
        return torch.cat((mean, deviation), 1)

    def logits(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] (and context [B, C0, H0, W0]) or [B, T, C] -> fp32 logits [B, E] or [B, T, E]."""
        h = self.pool(x, context) if x.dim() == 4 else x.float()
        if self.detach_input:  # detach_router: the router learns from what it reads, without changing it
            h = h.detach()
        # Weights are cast too: a model converted with .half() must still route in fp32, since low-precision
        # routers collapse onto a few experts.
        with torch.autocast(device_type=x.device.type, enabled=False):
            for layer in self.gate:
                h = F.linear(h, layer.weight.float(), layer.bias.float()) if isinstance(layer, nn.Linear) else layer(h)
        return h

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Routing:
        """Route x; gate noise is applied in training only. Non-finite logits raise instead of yielding NaN boxes."""
        logits = self.logits(x, context)
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()  # exported graphs stay branch-free
        if not tracing and not torch.isfinite(logits).all():
            raise FloatingPointError(
                f"non-finite router logits in MoE block {self.label}: its input or gate weights hold NaN/Inf "
                f"(lower lr0, keep amp on with fp32 routers, or check the data)"
            )
        noise = self.noise if self.training else 0.0
        generator = self.noise_generator(logits.device) if noise > 0 else None
        return route(logits, self.top_k, self.renormalize, noise, generator)
