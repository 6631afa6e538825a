"""Batched run of per-image conv experts: every (image, slot) pair through its chosen expert, one call per layer.

The training counterpart of static.py's `GatheredExperts`, on the experts' live parameters: each conv gathers the
chosen experts' weights and runs all pairs as one grouped conv (groups = pairs) or one batched matmul, and each
BatchNorm normalises every pair with the statistics of its expert's pairs (segment statistics), as the expert's own
BatchNorm does on the images routed to it. So one layer costs one call instead of one per expert; but the per-pair
weight copies and their gradients cost memory traffic that grows with the pairs, which on CPU outweighed the calls
saved (see `batched_mixture`).

Expert structure is walked module by module; `Conv`, `Conv2d`, `Bottleneck`, `C3`/`C3k`, `BottleneckStack` and
`nn.Sequential` are known, and their forwards below mirror Ultralytics' (tests compare them with the experts' own).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import C3, Bottleneck, Conv
from ultralytics.nn.modules.block import C3k

from .experts import BottleneckStack

MATMUL_MAX_PIXELS = 16  # maps up to this many pixels run k x k convs as a batched matmul (see `BatchedRun.conv`)


def matmul_columns(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """x [M, c1, H, W] as im2col columns [M, c1*kh*kw, H'*W'] where `conv` is faster as a matmul over them on CPU
    (ungrouped, and pointwise or on a map of at most MATMUL_MAX_PIXELS pixels); None where it should run as a conv."""
    pointwise = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
    if conv.groups != 1 or not (pointwise or x.shape[2] * x.shape[3] <= MATMUL_MAX_PIXELS):
        return None
    return x.flatten(2) if pointwise else F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)


def conv_output_size(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    """(H', W') of `conv`'s output on an H x W map, by nn.Conv2d's formula."""
    k, d, p, s = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    return tuple((n + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, n in enumerate((h, w)))


class BatchedRun:
    """One batched forward of U experts (the ones some pair chose) on M (image, slot) pairs.

    Args:
        index: [M] expert of each pair, in 0..U-1 (positions among the chosen experts).
        counts: U pairs per expert, all > 0.
    """

    def __init__(self, index: torch.Tensor, counts: list[int]):
        self.index = index
        self.counts = counts

    def __call__(self, experts: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """x [M, ...] -> [M, ...out], pair m through experts[index[m]]; `experts` are U modules of one structure."""
        m = experts[0]
        kind = type(m)
        if kind is BottleneckStack:
            stages = []
            for i in range(len(m.m)):
                x = self([e.m[i] for e in experts], x)
                stages.append(x)
            return torch.cat(stages, 1)
        if kind is nn.Sequential:
            for i in range(len(m)):
                x = self([e[i] for e in experts], x)
            return x
        if kind in (C3, C3k):  # C3.forward
            a = self([e.m for e in experts], self([e.cv1 for e in experts], x))
            return self([e.cv3 for e in experts], torch.cat((a, self([e.cv2 for e in experts], x)), 1))
        if kind is Bottleneck:  # Bottleneck.forward
            y = self([e.cv2 for e in experts], self([e.cv1 for e in experts], x))
            return x + y if m.add else y
        if kind is Conv:  # Conv.forward, or Conv.forward_fuse once fusing removed the BatchNorm
            y = self.conv([e.conv for e in experts], x)
            return m.act(self.batch_norm([e.bn for e in experts], y) if hasattr(m, "bn") else y)
        if kind is nn.Conv2d:
            return self.conv(experts, x)
        raise TypeError(f"expert module {kind.__name__} has no batched form; use dispatch='sparse'")

    def pair_params(self, stacked: torch.Tensor) -> torch.Tensor:
        """[U, ...] one tensor per expert -> [M, ...] the tensor each pair runs with (its expert's)."""
        return stacked.index_select(0, self.index)

    def conv(self, convs: Sequence[nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
        """Each pair's conv with its expert's weights: x [M, c1, H, W] -> [M, c2, H', W'].

        One batched matmul over im2col columns for pointwise convs and small maps, else one grouped conv (groups =
        pairs): on CPU the matmul is the faster of the two there, and the grouped conv on larger maps.
        """
        c = convs[0]
        if c.padding_mode != "zeros":
            raise TypeError(f"expert conv pads with '{c.padding_mode}'; the batched form pads with zeros")
        m, _, h, w = x.shape
        weight = self.pair_params(torch.stack([c.weight for c in convs]))  # [M, c2, c1/g, kh, kw]
        bias = None if c.bias is None else self.pair_params(torch.stack([c.bias for c in convs]))  # [M, c2]
        cols = matmul_columns(c, x)
        if cols is not None:
            y = weight.flatten(2) @ cols  # [M, c2, H'*W']
            y = y if bias is None else y + bias.unsqueeze(2)
            return y.view(m, -1, *conv_output_size(c, h, w))
        y = F.conv2d(x.flatten(0, 1).unsqueeze(0), weight.flatten(0, 1), bias if bias is None else bias.flatten(),
                     c.stride, c.padding, c.dilation, m * c.groups)  # fmt: skip
        return y.view(m, -1, *y.shape[2:])

    def batch_norm(self, bns: Sequence[nn.BatchNorm2d], y: torch.Tensor) -> torch.Tensor:
        """Each expert's BatchNorm on its pairs: y [M, C, H, W] -> [M, C, H, W].

        With batch statistics (training), expert u normalises over its pairs' N_u = counts[u] * H * W values per
        channel and updates its running statistics as nn.BatchNorm2d does; otherwise it uses its running statistics.
        """
        bn = bns[0]
        batch_stats = bn.training or bn.running_mean is None  # the rule of nn.BatchNorm2d.forward
        if batch_stats:
            if min(self.counts) * y.shape[2] * y.shape[3] < 2:  # nn.BatchNorm2d's error, not an infinite variance
                raise ValueError(f"Expected more than 1 value per channel when training, got {list(y.shape)}")
            # per pair [M, C], in two passes: on CPU ~10x faster than torch.var_mean over the small maps here
            mean_i = y.mean((2, 3))
            var_i = (y - mean_i[..., None, None]).square().mean((2, 3))
            # Every pair has H*W values, so an expert's mean is the mean of its pairs' means and its variance the mean
            # of their variances plus the spread of their means (law of total variance): one pass over y, exact.
            n = y.new_tensor(self.counts).unsqueeze(1)  # [U, 1] pairs per expert
            mean = y.new_zeros(len(bns), y.shape[1]).index_add(0, self.index, mean_i) / n
            spread = (mean_i - self.pair_params(mean)).square()
            var = y.new_zeros(mean.shape).index_add(0, self.index, var_i + spread) / n
            if bn.training and bn.track_running_stats:
                self._update_running_stats(bns, mean.detach(), var.detach(), y.shape[2] * y.shape[3])
        else:
            mean = torch.stack([b.running_mean for b in bns])
            var = torch.stack([b.running_var for b in bns])
        scale = (var + bn.eps).rsqrt()
        shift = -mean * scale
        if bn.affine:
            weight = torch.stack([b.weight for b in bns])
            scale, shift = scale * weight, shift * weight + torch.stack([b.bias for b in bns])
        scale, shift = (self.pair_params(t)[..., None, None] for t in (scale, shift))
        return torch.addcmul(shift, y, scale)

    @torch.no_grad()
    def _update_running_stats(
        self, bns: Sequence[nn.BatchNorm2d], mean: torch.Tensor, var: torch.Tensor, per_pair: int
    ) -> None:
        """running <- (1 - momentum) * running + momentum * batch, with the unbiased variance, for each expert."""
        for b, count, mu, v in zip(bns, self.counts, mean, var):
            n = count * per_pair
            b.num_batches_tracked.add_(1)
            momentum = b.momentum if b.momentum is not None else 1.0 / float(b.num_batches_tracked)
            b.running_mean.lerp_(mu, momentum)
            b.running_var.lerp_(v * (n / (n - 1)), momentum)
