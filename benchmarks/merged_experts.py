"""Prototype recipe: top-k merged experts (each image runs ONE conv stack whose weights mix its k chosen experts).

    python benchmarks/merged_experts.py data=synth-shapes.yaml epochs=20 imgsz=128 batch=16 nbs=16 workers=1 seed=0 \
        top_k=2 project=/tmp/exp/train name=merged_k2 [any other `visionmoe train` setting]

Trains visionmoe-yolo-n (default recipe) where every MoEC3k2 block, once routing starts, runs for each image the
expert whose parameters are the gate-weighted sum of its k chosen experts' (conv weights and BatchNorm scale and
shift), in the spirit of CondConv (Yang et al. 2019) and SMEAR (Muqeeth et al. 2023), but over the top-k only: each
image still costs one expert's convs (plus merging k weight sets, a few kFLOPs per image), while at k=2 every expert
trains on half the images instead of a quarter and the router gets the task gradient through the mix, not only
through log p. BatchNorm statistics are shared by the batch (as after a dynamic conv) and kept in expert 0's
buffers, and copied into the other experts' so that Ultralytics' Conv+BN fusion before its final validation folds
the statistics the experts ran with; the merged scale and shift are per image. At k=1 this is the default MoE except
for those batch-wide statistics. Validation runs the same merged experts. Not an export form: a batch-1 export would
merge weights at runtime, like the `gather` form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from block_prototype import train_with_block
from torch import nn

from visionmoe.nn.batched import BatchedRun
from visionmoe.nn.blocks import MoEC3k2
from visionmoe.nn.routing import Routing


class MergedRun(BatchedRun):
    """One forward of N images, image n through the sum over j of gates[n, j] * experts[indices[n, j]] (merged
    parameters); `experts` are all E experts of a block, in order."""

    def __init__(self, indices: torch.Tensor, gates: torch.Tensor):
        super().__init__(indices[:, 0], [])
        self.indices, self.gates = indices, gates

    def pair_params(self, stacked: torch.Tensor) -> torch.Tensor:
        """[E, ...] per-expert tensors -> [N, ...] per-image gate-weighted sums over the chosen experts."""
        chosen = stacked[self.indices]  # [N, k, ...]: only the chosen experts are read (and get gradients)
        return (chosen * self.gates.to(stacked.dtype).view(*self.gates.shape, *(1,) * (stacked.dim() - 1))).sum(1)

    def batch_norm(self, bns: Sequence[nn.BatchNorm2d], y: torch.Tensor) -> torch.Tensor:
        bn = bns[0]  # statistics over the whole batch, kept in expert 0's buffers
        y = F.batch_norm(y, bn.running_mean, bn.running_var, None, None, bn.training, bn.momentum or 0.1, bn.eps)
        if bn.training:  # every expert holds the shared statistics, so that fusing each expert's BN folds them
            with torch.no_grad():
                for other in bns[1:]:
                    other.running_mean.copy_(bn.running_mean)
                    other.running_var.copy_(bn.running_var)
        scale = self.pair_params(torch.stack([b.weight for b in bns]))[..., None, None]
        shift = self.pair_params(torch.stack([b.bias for b in bns]))[..., None, None]
        return torch.addcmul(shift, y, scale)


class MergedMoEC3k2(MoEC3k2):
    """MoEC3k2 whose sparse dispatch runs merged top-k experts (see `MergedRun`)."""

    def mixture(self, x: torch.Tensor, experts: nn.ModuleList, routing: Routing) -> torch.Tensor:
        if self.dispatch != "sparse":
            return super().mixture(x, experts, routing)
        return MergedRun(routing.indices, routing.gates)(list(experts), x)


if __name__ == "__main__":
    train_with_block(MergedMoEC3k2)
