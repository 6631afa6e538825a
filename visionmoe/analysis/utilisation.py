"""Expert utilisation: how often each expert of each MoE block was chosen, per epoch."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from ultralytics.utils import LOGGER

from ..nn.routing import expert_counts

DEAD_FRACTION = 0.25  # an expert under a quarter of its fair share 1/E is dead


def dominant_share(num_experts: int) -> float:
    """Share above which one expert dominates: twice its fair share, capped at 0.9 so that E=2 can trigger it."""
    return min(2.0 / num_experts, 0.9)


class UtilisationTracker:
    """Accumulates per-block expert counts from each training step's routing and writes them once per epoch."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}

    def update(self, named_blocks) -> None:
        """Add the last routing of every (name, MoE block) pair; blocks carry `.router.num_experts` and `.routing`."""
        for name, block in named_blocks:
            if block.routing is not None:
                counts = expert_counts(block.routing.indices.detach(), block.router.num_experts).cpu()
                self.counts[name] = self.counts.get(name, 0) + counts

    def shares(self) -> dict[str, torch.Tensor]:
        """Per block, the fraction of all assignments that went to each expert."""
        return {name: c.double() / max(int(c.sum()), 1) for name, c in self.counts.items()}

    def imbalances(self) -> list[str]:
        """One message per block with dead (< 1/4 fair share) or dominant experts."""
        messages = []
        for i, share in self.shares().items():
            e = len(share)
            if e < 2:
                continue
            dead = [j for j, s in enumerate(share.tolist()) if s < DEAD_FRACTION / e]
            dominant = [j for j, s in enumerate(share.tolist()) if s > dominant_share(e)]
            if dead or dominant:
                parts = [f"dead experts {dead}"] * bool(dead) + [f"dominant experts {dominant}"] * bool(dominant)
                shares = ", ".join(f"{s:.2f}" for s in share.tolist())
                messages.append(f"MoE block {i}: {' and '.join(parts)} (shares {shares}, fair share {1 / e:.2f})")
        return messages

    def write(self, path: Path, epoch: int) -> None:
        """Append one row per (layer, expert) for this epoch to a CSV, warn about imbalance, and reset the counts."""
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["epoch", "layer", "expert", "count", "share"])
            for i, share in self.shares().items():
                for j, (count, s) in enumerate(zip(self.counts[i].tolist(), share.tolist())):
                    writer.writerow([epoch, i, j, count, round(s, 5)])
        for message in self.imbalances():
            LOGGER.warning(message)
        self.counts.clear()
