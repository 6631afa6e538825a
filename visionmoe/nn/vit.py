"""Vision Transformer parts of the ViT-MoE detector (V-MoE recipe, ViTDet-style neck).

A patch stem to stride 16, fixed 2-D sine-cosine positions computed from the token grid (so any image size that is
a multiple of 32 works), pre-norm transformer blocks whose MLP is dense (`Mlp`) or a token-routed MoE (`MoEMlp`),
and a simple feature pyramid that resamples the stride-16 map to P3/P4/P5 for the YOLO Detect head.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import nn
from ultralytics.nn.modules import Conv, ConvTranspose

from .blocks import MoEMlp
from .settings import MoESettings


def sincos_pos_embed(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[h*w, dim] fixed 2-D position encoding (MAE/ViTDet): sin and cos of the column in the first half of the
    channels, of the row in the second half, at dim/4 geometric frequencies."""
    omega = temperature ** -(torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    x, y = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), 1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: [B, C, H, W] -> ([B, H/p * W/p, D], (H/p, W/p)).

    H and W must be multiples of `multiple` (a multiple of the patch size p), so that every pyramid level tiles the
    image exactly.
    """

    def __init__(self, c1: int, dim: int, patch: int, multiple: int):
        super().__init__()
        self.proj = nn.Conv2d(c1, dim, patch, patch)
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of {self.multiple}: the ViT detector needs height and width "
                f"divisible by {self.multiple} (patch stride {self.proj.stride[0]}, P5 stride {self.multiple})"
            )
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class Attention(nn.Module):
    """Multi-head self-attention: [B, T, D] -> [B, T, D].

    Written as explicit matmuls rather than scaled_dot_product_attention, whose CPU kernel the FLOP counter does not
    see, so that reported GFLOPs include attention.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)  # [B, heads, T, T]
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """Dense transformer MLP: [B, T, D] -> fc1 -> GELU -> fc2 -> [B, T, D]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x)); [B, T, D] -> [B, T, D]."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def moe_block_indices(depth: int, every: int, last: float) -> list[int]:
    """Blocks whose MLP is MoE (V-MoE 'Every-n' within 'Last-n'): every `every`-th block, counted back from the last
    one, among the last `ceil(last * depth)` blocks. depth 12, every 2, last 0.5 -> [7, 9, 11]."""
    first = depth - math.ceil(last * depth)
    return [i for i in range(first, depth) if (depth - 1 - i) % every == 0]


class ViT(nn.Module):
    """Plain ViT backbone: image [B, C, H, W] -> stride-16 map [B, D, H/16, W/16].

    Blocks listed in `moe_blocks` get a token-routed `MoEMlp` with `settings`; the others a dense `Mlp`.
    """

    patch = 16

    def __init__(
        self,
        c1: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        moe_blocks: Collection[int],
        settings: MoESettings,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(c1, dim, self.patch, 2 * self.patch)  # P5 is one stride-2 step below
        hidden = int(dim * mlp_ratio)
        self.blocks = nn.ModuleList(
            ViTBlock(dim, num_heads, MoEMlp(dim, hidden, settings) if i in moe_blocks else Mlp(dim, hidden))
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = self.patch_embed(x)
        x = x + sincos_pos_embed(h, w, x.shape[-1]).to(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).transpose(1, 2).reshape(x.shape[0], -1, h, w)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple pyramid: one stride-16 map [B, D, H, W] -> [P3, P4, P5] with c channels each.

    P3 upsamples 2x with a transposed conv, P4 keeps the resolution, P5 downsamples with a stride-2 conv; each level
    ends in a 3x3 conv.
    """

    strides = (8, 16, 32)

    def __init__(self, dim: int, c: int):
        super().__init__()
        self.p3 = nn.Sequential(ConvTranspose(dim, c, 2, 2), Conv(c, c, 3))
        self.p4 = nn.Sequential(Conv(dim, c, 1), Conv(c, c, 3))
        self.p5 = nn.Sequential(Conv(dim, c, 3, 2), Conv(c, c, 3))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.p3(x), self.p4(x), self.p5(x)]


def dense_baseline(model: nn.Module) -> nn.Module:
    """Turn a ViT-MoE into the ViT it is measured against, in place: every MoE MLP becomes a dense `Mlp` of one
    expert's shape (freshly initialised)."""
    for block in model.modules():
        if isinstance(block, ViTBlock) and isinstance(block.mlp, MoEMlp):
            dim, hidden = block.mlp.experts.w1.shape[1:]
            block.mlp = Mlp(dim, hidden)
    return model
