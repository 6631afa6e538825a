"""Expert utilisation: how often each expert of each MoE block was chosen, per epoch, and for token-routed blocks
how often a choice found its expert full (drop rate)."""

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


def dead_experts(shares: list[float]) -> list[int]:
    """Experts of one block chosen for under a quarter of their fair share 1/E (none when E < 2)."""
    e = len(shares)
    return [j for j, s in enumerate(shares) if s < DEAD_FRACTION / e] if e > 1 else []


def dominant_experts(shares: list[float]) -> list[int]:
    """Experts of one block chosen for more than `dominant_share(E)` of the assignments (none when E < 2)."""
    e = len(shares)
    return [j for j, s in enumerate(shares) if s > dominant_share(e)] if e > 1 else []


class UtilisationTracker:
    """Accumulates per-block expert counts from each training step's routing and writes them once per epoch."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.kept: dict[str, torch.Tensor] = {}  # token-routed blocks only: assignments that got a slot

    def update(self, named_blocks) -> None:
        """Add the last routing of every (name, MoE block) pair; blocks carry `.router.num_experts` and `.routing`,
        token-routed ones also `.kept`, the mask of assignments within expert capacity. Tied blocks are skipped: one
        expert ran, whatever their routers (taught under `domain_loss`) chose."""
        for name, block in named_blocks:
            if block.routing is not None and not getattr(block, "tied", False):
                indices, e = block.routing.indices.detach(), block.router.num_experts
                self.counts[name] = self.counts.get(name, 0) + expert_counts(indices, e).cpu()
                kept = getattr(block, "kept", None)
                if kept is not None:
                    self.kept[name] = self.kept.get(name, 0) + expert_counts(indices[kept], e).cpu()

    def drop_rates(self) -> dict[str, torch.Tensor]:
        """Per token-routed block, the fraction of each expert's assignments dropped for lack of capacity."""
        rates = {}
        for name, kept in self.kept.items():
            counts = self.counts[name]
            rates[name] = (counts - kept).double() / counts.clamp(min=1)  # an expert nobody chose dropped nothing
        return rates

    def shares(self) -> dict[str, torch.Tensor]:
        """Per block, the fraction of all assignments that went to each expert."""
        return {name: c.double() / max(int(c.sum()), 1) for name, c in self.counts.items()}

    def imbalances(self) -> list[str]:
        """One message per block with dead (< 1/4 fair share) or dominant experts."""
        messages = []
        for i, share in self.shares().items():
            e = len(share)
            dead, dominant = dead_experts(share.tolist()), dominant_experts(share.tolist())
            if dead or dominant:
                parts = [f"dead experts {dead}"] * bool(dead) + [f"dominant experts {dominant}"] * bool(dominant)
                shares = ", ".join(f"{s:.2f}" for s in share.tolist())
                messages.append(f"MoE block {i}: {' and '.join(parts)} (shares {shares}, fair share {1 / e:.2f})")
        return messages

    def write(self, path: Path, epoch: int) -> None:
        """Append one row per (layer, expert) for this epoch to a CSV, warn about imbalance, and reset the counts.

        drop_rate is left empty for per-image blocks, which have no capacity limit.
        """
        new = not path.exists()
        drops = self.drop_rates()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["epoch", "layer", "expert", "count", "share", "drop_rate"])
            for i, share in self.shares().items():
                rates = drops[i].tolist() if i in drops else [""] * len(share)
                for j, (count, s, d) in enumerate(zip(self.counts[i].tolist(), share.tolist(), rates)):
                    writer.writerow([epoch, i, j, count, round(s, 5), d if d == "" else round(d, 5)])
        for message in self.imbalances():
            LOGGER.warning(message)
        self.counts.clear()
        self.kept.clear()
