"""Static dispatch of per-image conv experts: the export forms of a conv MoE, with static shapes, in which only the
chosen experts compute. Both are snapshots with BatchNorm folded in, for inference and export only.

'gather' (`GatheredExperts`): one module of the experts' shared structure whose convs hold the E experts' weights
stacked [E, ...]. A forward gathers the chosen experts' weights and runs every (image, slot) pair as one group of a
grouped conv: TopK -> Gather(weights) -> Conv(groups=N*g), branch-free, with conv weights computed at runtime.

'branch' (`BranchExperts`): each expert its own constant-weight module. Traced for ONNX, each (image, slot) pair
becomes one `visionmoe::ExpertSwitch` placeholder, which export/branches.py replaces by an `If` tree over the
experts' own subgraphs: the conv weights stay constants, and runtimes run only the taken branch.
"""

from __future__ import annotations

import warnings
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from ultralytics.nn.modules import C3, Bottleneck, Conv, DWConv
from ultralytics.nn.modules.block import C3k

from .experts import BottleneckStack


class StaticExportError(ValueError):
    """A model or setting that has no static (sparse, export-ready) form; the message names what and why."""


# Modules the converter reuses as they are: their forward treats each item (image) on its own and their only
# parameters sit in convs, which are swapped for gathered ones. Exact types, since a subclass may override forward.
PER_ITEM_CONTAINERS = (BottleneckStack, Bottleneck, C3, C3k, nn.Sequential, nn.ModuleList)
ACTIVATIONS = (nn.Identity, nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.Mish)
CONVS = (Conv, DWConv)  # Ultralytics Conv2d + BatchNorm + activation; BN is folded into the gathered weights


class GatheredConv2d(nn.Module):
    """Conv2d over E stacked experts' weights; item n runs with the weights of expert `index[n]`.

    x [N, c1, H, W] -> [N, c2, H', W'], as one grouped conv with the N items folded into the channel (group) axis.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, like: nn.Conv2d):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())  # [E, c2, c1/g, kh, kw]
        self.register_buffer("bias", bias.detach().clone())  # [E, c2]
        self.stride, self.padding, self.dilation, self.groups = like.stride, like.padding, like.dilation, like.groups
        self.index: torch.Tensor | None = None  # [N] expert per item, or [] for one item; set by GatheredExperts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index.dim() == 0:  # one item: a plain conv with the gathered weights, no reshapes around it
            w, b = self.weight[self.index], self.bias[self.index]
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        n = x.shape[0]
        w = self.weight[self.index].flatten(0, 1)  # [N*c2, c1/g, kh, kw]
        b = self.bias[self.index].flatten()  # [N*c2]
        y = F.conv2d(x.flatten(0, 1).unsqueeze(0), w, b, self.stride, self.padding, self.dilation, n * self.groups)
        return y.view(n, -1, *y.shape[2:])


def _folded(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of an Ultralytics Conv or a Conv2d, with its BatchNorm (if not fused yet) folded in."""
    c = conv.conv if isinstance(conv, CONVS) else conv
    bias = c.bias if c.bias is not None else torch.zeros(c.out_channels, dtype=c.weight.dtype, device=c.weight.device)
    bn = getattr(conv, "bn", None)
    if bn is None:
        return c.weight, bias
    return fuse_conv_bn_weights(c.weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


def _check_convertible(expert: nn.Module) -> None:
    """Raise StaticExportError naming the first module of `expert` that the converter does not know."""
    for name, m in expert.named_modules():
        path = name or "(expert root)"
        if type(m) in CONVS:
            if type(m.conv) is not nn.Conv2d or type(getattr(m, "bn", None)) not in (nn.BatchNorm2d, type(None)):
                raise StaticExportError(f"expert conv '{path}' is not a Conv2d with an optional BatchNorm2d")
        elif type(m) is nn.Conv2d:
            if m.padding_mode != "zeros":
                raise StaticExportError(f"expert conv '{path}' pads with '{m.padding_mode}', only 'zeros' is static")
        elif type(m) not in PER_ITEM_CONTAINERS + ACTIVATIONS and not _owned_by_conv(expert, name):
            raise StaticExportError(
                f"expert module '{path}' ({type(m).__name__}) has no static export form; known modules are "
                f"{', '.join(t.__name__ for t in (*CONVS, nn.Conv2d, *PER_ITEM_CONTAINERS, *ACTIVATIONS))}"
            )


def _owned_by_conv(root: nn.Module, name: str) -> bool:
    """True for the conv and bn children of an Ultralytics Conv, which are converted with their parent."""
    parent, _, child = name.rpartition(".")
    return bool(name) and child in {"conv", "bn"} and type(root.get_submodule(parent)) in CONVS


def _run_fused(conv: nn.Module) -> None:
    """Run an Ultralytics Conv whose BatchNorm is folded into its conv as act(conv(x))."""
    if hasattr(conv, "bn"):
        delattr(conv, "bn")
    conv.forward = conv.forward_fuse


class GatheredExperts(nn.Module):
    """E experts of one block as one module of their shared structure, whose convs gather the chosen experts' weights.

    A snapshot: built from the experts' current weights (BN folded), so rebuild it after the experts change.
    forward(x [N, ...], index [N]) runs item n through expert index[n] -> [N, ...out].
    """

    def __init__(self, experts: nn.ModuleList):
        super().__init__()
        for expert in experts:
            _check_convertible(expert)
        self.body = deepcopy(experts[0])
        self.convs: list[GatheredConv2d] = []  # plain list: the modules are registered inside `body`
        for name, m in list(self.body.named_modules()):
            if type(m) not in (*CONVS, nn.Conv2d) or _owned_by_conv(self.body, name):
                continue
            folded = [_folded(expert.get_submodule(name)) for expert in experts]
            conv = m.conv if type(m) in CONVS else m
            gathered = GatheredConv2d(torch.stack([w for w, _ in folded]), torch.stack([b for _, b in folded]), conv)
            self.convs.append(gathered)
            if type(m) in CONVS:  # keep the Conv (and its activation) but run it as fused: act(conv(x))
                m.conv = gathered
                _run_fused(m)
            elif name:
                parent, _, child = name.rpartition(".")
                setattr(self.body.get_submodule(parent), child, gathered)
            else:  # the expert is a bare Conv2d
                self.body = gathered
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        index = index[0] if len(index) == 1 else index  # batch 1: one scalar index that every conv gathers with
        for conv in self.convs:
            conv.index = index
        try:
            return self.body(x)
        finally:
            for conv in self.convs:
                conv.index = None  # drop the tensor so that the module holds no per-batch state


def _fused_expert(expert: nn.Module) -> nn.Module:
    """Copy of `expert` with the BatchNorm of each Ultralytics Conv folded into its conv, run as act(conv(x))."""
    expert = deepcopy(expert).requires_grad_(False)
    for m in list(expert.modules()):  # listed first: folding deletes modules
        if type(m) in CONVS:
            m.conv.weight, m.conv.bias = (nn.Parameter(t.detach().clone(), requires_grad=False) for t in _folded(m))
            _run_fused(m)
    return expert


class ExpertSwitch(torch.autograd.Function):
    """One item x [1, ...] through expert `index` [1] of `branches`; in a traced ONNX graph, one placeholder node.

    The node, `visionmoe::ExpertSwitch(x, index)` with attributes `block` (the block's module path) and `shape` (x's),
    keeps the traced graph static until export/branches.py replaces it by an `If` tree over the block's experts.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, branches: BranchExperts) -> torch.Tensor:
        if not torch.jit.is_tracing():
            return branches.experts[int(index)](x)
        # Traced, only the placeholder enters the graph (see `symbolic`): the expert run here just gives the output.
        # The tracer records this body as a subgraph of the placeholder, and fails on calls to modules of the traced
        # model in there; a copy is outside the model, and its weights are constants.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # int(index): the graph does not depend on it
            expert = deepcopy(branches.experts[int(index)])
        return expert(x)

    @staticmethod
    def symbolic(g, x, index, branches: BranchExperts):
        # The input's shape rides along as an attribute: the exported file keeps no shapes around a custom op, but the
        # pass that replaces the node exports the experts at that shape. The output type keeps the traced graph static.
        size = x.type().sizes()
        y = g.op("visionmoe::ExpertSwitch", x, index, block_s=branches.name, shape_i=size)
        return y.setType(x.type().with_sizes(branches.output_size(size)))


class BranchExperts(nn.Module):
    """E experts of one block, each its own BN-folded module with constant weights, for inference and export only.

    A snapshot: built from the experts' current weights, so rebuild it after the experts change.
    forward(x [N, ...], index [N]) runs item n through expert index[n] -> [N, ...out], one `ExpertSwitch` per item.
    """

    def __init__(self, experts: nn.ModuleList):
        super().__init__()
        for expert in experts:
            _check_convertible(expert)
        self.experts = nn.ModuleList(_fused_expert(expert) for expert in experts)
        self.name = ""  # module path of the block, set by export: it names the placeholders of this block

    @torch.no_grad()
    def output_size(self, size: list[int]) -> list[int]:
        """Output size of the experts (all alike) for an input of `size`."""
        weight = next(self.parameters())
        return list(self.experts[0](weight.new_zeros(size)).shape)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:  # the batch-1 export: no Split and Concat around the switch
            return ExpertSwitch.apply(x, index, self)
        return torch.cat([ExpertSwitch.apply(xn, i, self) for xn, i in zip(x.split(1), index.split(1))])
