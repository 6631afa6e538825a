"""Routing figures: utilisation bars, routing matrices and routing maps (matplotlib, default fonts, no downloads)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from ultralytics.utils import plt_settings

from .recorder import LayerRouting
from .utilisation import DEAD_FRACTION, dominant_share


def expert_colours(num_experts: int) -> list[tuple[float, ...]]:
    """Distinct RGBA colours for E experts (matplotlib's tab10, or tab20 above 10 experts, then repeating)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_experts <= 10 else "tab20"]
    return [cmap(e % cmap.N) for e in range(num_experts)]


def _grid(n: int, cols: int) -> tuple[int, int]:
    cols = min(n, cols)
    return math.ceil(n / cols), cols


@plt_settings()
def plot_utilisation(layers: dict[str, dict], path: Path) -> None:
    """One bar chart per layer of each expert's share of assignments, with the fair, dead and dominant levels.

    layers: name -> summary entry with 'utilisation' ([E] shares).
    """
    import matplotlib.pyplot as plt

    rows, cols = _grid(len(layers), 4)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, layer) in zip(axes.flat, layers.items()):
        shares = layer["utilisation"]
        e = len(shares)
        ax.bar(range(e), shares, color=expert_colours(e))
        ax.axhline(1 / e, color="k", lw=1, ls="--", label="fair share")
        ax.axhline(DEAD_FRACTION / e, color="tab:red", lw=0.8, ls=":", label="dead below")
        ax.axhline(dominant_share(e), color="tab:orange", lw=0.8, ls=":", label="dominant above")
        ax.set(title=name, xlabel="expert", ylabel="share", xticks=range(e), ylim=(0, 1))
        ax.title.set_fontsize(9)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


@plt_settings()
def plot_routing_matrix(layers: dict[str, dict], factor: str, path: Path) -> None:
    """One heatmap per layer: rows = groups of `factor` (classes, sizes, domains), cells = the share of each row's
    assignments that went to each expert. Rows without assignments are left out; titles give the NMI.

    layers: name -> summary entry with 'routing_matrices'[factor] ({'rows', 'counts'}) and 'nmi'[factor].
    """
    import matplotlib.pyplot as plt

    rows, cols = _grid(len(layers), 4)
    height = max(sum(1 for c in layer["routing_matrices"][factor]["counts"] if sum(c)) for layer in layers.values())
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, (1.2 + 0.16 * height) * rows), squeeze=False)
    for ax, (name, layer) in zip(axes.flat, layers.items()):
        table = layer["routing_matrices"][factor]
        counts = np.asarray(table["counts"], dtype=np.float64)
        used = counts.sum(1) > 0
        shares = counts[used] / counts[used].sum(1, keepdims=True)
        labels = [r for r, u in zip(table["rows"], used) if u]
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_xticks(range(counts.shape[1]))
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(f"{name}\nNMI {layer['nmi'][factor]:.3f}", fontsize=8)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    fig.suptitle(f"expert share per {factor}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


@plt_settings()
def plot_image_routing(name: str, layer: LayerRouting, thumbnails: dict[int, np.ndarray], path: Path) -> None:
    """Per-image routing map: one row per expert with example images whose top-1 choice it was."""
    import matplotlib.pyplot as plt

    cols = max(1, max(len(ids) for ids in layer.examples))
    palette = expert_colours(layer.num_experts)
    fig, axes = plt.subplots(layer.num_experts, cols, figsize=(1.6 * cols, 1.6 * layer.num_experts), squeeze=False)
    for e, ids in enumerate(layer.examples):
        for j, ax in enumerate(axes[e]):
            ax.set(xticks=[], yticks=[])
            if j < len(ids):
                ax.imshow(thumbnails[ids[j]])
            elif j:
                ax.axis("off")
            else:
                ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            for spine in ax.spines.values():
                spine.set(color=palette[e], linewidth=3)
        axes[e, 0].set_ylabel(f"expert {e}", fontsize=8)
    fig.suptitle(f"{name}: example images by top-1 expert", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


@plt_settings()
def plot_token_routing(name: str, layer: LayerRouting, thumbnails: dict[int, np.ndarray], path: Path) -> None:
    """Token routing map: each example image with every token tinted by its top-1 expert; dropped tokens are black."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    palette = np.array([*expert_colours(layer.num_experts), (0.0, 0.0, 0.0, 1.0)])[:, :3]
    rows, cols = _grid(len(layer.examples), 4)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax, (image_id, top1, dropped) in zip(axes.flat, layer.examples):
        image = thumbnails[image_id]
        h, w = image.shape[:2]
        ax.imshow(image)
        ax.imshow(palette[np.where(dropped, layer.num_experts, top1)], alpha=0.45, extent=(0, w, h, 0))
        ax.axis("off")
    for ax in axes.flat[len(layer.examples) :]:
        ax.axis("off")
    handles = [Patch(color=palette[e], label=f"expert {e}") for e in range(layer.num_experts)]
    fig.legend(handles=[*handles, Patch(color="k", label="dropped")], loc="center right", fontsize=7)
    fig.suptitle(f"{name}: top-1 expert per token", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)
